"""Proves a refactor leaves training numerics unchanged: records every step's metrics of the
runs behind the committed results tables, at two commits, and compares them.

  # before the change (or at any old commit), in a worktree of it:
  git worktree add /tmp/ref <commit>
  env -u XLA_FLAGS JAX_PLATFORMS=cpu PYTHONPATH=/tmp/ref \\
      python bench/numerics_check.py record /tmp/ref.json [--suite semisup|two_tower|all]
  # after it:
  env -u XLA_FLAGS JAX_PLATFORMS=cpu PYTHONPATH=. \\
      python bench/numerics_check.py record /tmp/new.json [--suite ...]
  python bench/numerics_check.py compare /tmp/ref.json /tmp/new.json

``record`` trains each run's config (read from the ``configs/`` of the repository whose
``bigvl`` is on ``PYTHONPATH``) for ``--steps`` steps with ``log_every=1`` and no evaluators on
one CPU device, via ``bigvl.train.train``, and stores every step's ``metrics.jsonl`` row minus
timing columns. Suites: ``semisup`` -- the ten methods of ``docs/results/semisup_mnist.md``
(``configs/semisup_mnist.py:<method>,tiny``) plus the confidence-masked ones at threshold 0
(``<method>@t0``: their unlabeled branch is live from step 0); ``two_tower`` -- every run of
``docs/results/fff_shapes.md`` (``configs/fff_shapes.py``) and the SigLIP / CLIP demos.
``compare`` prints the max abs difference per run and exits 1 above ``--tol`` (1e-6), or if a
run, a step or a metric is missing on one side (metrics only one side has are listed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

SEMISUP_METHODS = ("supervised", "pi_model", "temporal_ensembling", "mean_teacher", "vat",
                   "pseudo_label", "entropy_min", "mixmatch", "uda", "fixmatch")
#: methods with a confidence threshold: also run at threshold 0 (mask 1 everywhere).
THRESHOLDED = ("pseudo_label", "uda", "fixmatch")
#: metrics.jsonl columns that measure time (or name a column that moved), not numerics.
TIMING = ("examples_per_s", "tflops_per_device", "mfu", "data_skipped")


def runs(suite: str, data_dir: str) -> list[tuple[str, str, str, dict]]:
  """``(run name, config file stem, arg, overrides)``."""
  out = []
  if suite in ("semisup", "all"):
    out += [(m, "semisup_mnist", f"{m},tiny", {}) for m in SEMISUP_METHODS]
    out += [(f"{m}@t0", "semisup_mnist", f"{m},tiny", {"semisup.threshold": 0.0})
            for m in THRESHOLDED]
  if suite in ("two_tower", "all"):
    data = {"input.data_dir": data_dir}
    out += [("fff/baseline", "fff_shapes", "tiny,baseline", data),
            ("fff/fff", "fff_shapes", "tiny", data),
            ("fff/unweighted", "fff_shapes", "tiny", {**data,
                                                     "loss.mining.normalize": False}),
            ("fff/k5_only", "fff_shapes", "tiny", {**data, "loss.mining.source": "none"}),
            ("fff/mining_only", "fff_shapes", "tiny,k=1", {**data,
                                                          "loss.mining.normalize": False}),
            # Mining starts after a warm-up in the table's runs: here from step 1 too, so its
            # code path is compared (self-mining and the ring's sharded variant).
            ("fff/fff@mine1", "fff_shapes", "tiny", {**data, "loss.mining.start_step": 1}),
            ("fff/unweighted@mine1", "fff_shapes", "tiny", {
                **data, "loss.mining.normalize": False, "loss.mining.start_step": 1}),
            ("siglip", "siglip_shapes", "tiny", data),
            ("clip", "clip_shapes", "tiny", data)]
  return out


def record(path: str, suite: str, steps: int, only: list[str], data_dir: str) -> None:
  import ml_collections as mlc

  import bigvl
  from bigvl import train
  from bigvl.config import load_sibling

  repo = os.path.dirname(os.path.dirname(os.path.abspath(bigvl.__file__)))
  print(f"bigvl from {repo}", flush=True)
  results = {}
  for name, stem, arg, overrides in runs(suite, data_dir):
    if only and name not in only:
      continue
    c = load_sibling(os.path.join(repo, "configs", "x.py"), stem).get_config(arg)
    c.total_steps, c.log_every, c.ckpt_every = steps, 1, steps
    c.evals = mlc.ConfigDict()
    c.update_from_flattened_dict(overrides)
    with tempfile.TemporaryDirectory() as workdir:
      train.train(c, workdir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    results[name] = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    print(f"{name}: {results[name][-1]}", flush=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)


def compare(ref_path: str, new_path: str, tol: float) -> int:
  with open(ref_path) as f:
    ref = json.load(f)
  with open(new_path) as f:
    new = json.load(f)
  bad = 0
  print("| run | steps | metrics compared | max abs diff | only in one |\n|---|---:|---:|---:|---|")
  for name in sorted(set(ref) | set(new)):
    if name not in ref or name not in new:
      print(f"| {name} | missing in {'new' if name in ref else 'ref'} | | | |")
      bad += 1
      continue
    a, b = ref[name], new[name]
    if [r["step"] for r in a] != [r["step"] for r in b]:
      print(f"| {name} | steps differ | | | |")
      bad += 1
      continue
    common = set.intersection(*(set(r) for r in a + b))
    only = sorted(set.union(*(set(r) for r in a + b)) - common)
    diff = max((abs(x[k] - y[k]) for x, y in zip(a, b, strict=True) for k in common),
               default=0.0)
    print(f"| {name} | {len(a)} | {len(common)} | {diff:.3g} | {', '.join(only)} |")
    bad += diff > tol or "loss" not in common
  print("OK" if not bad else f"{bad} run(s) differ by more than {tol}")
  return int(bad > 0)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  rec = sub.add_parser("record")
  rec.add_argument("out")
  rec.add_argument("--suite", choices=("semisup", "two_tower", "all"), default="all")
  rec.add_argument("--steps", type=int, default=4)
  rec.add_argument("--only", default="", help="comma-separated run names")
  rec.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "bigvl_numerics"),
                   help="where the shapes_captions datasets are prepared (shared by runs)")
  cmp = sub.add_parser("compare")
  cmp.add_argument("ref")
  cmp.add_argument("new")
  cmp.add_argument("--tol", type=float, default=1e-6)
  args = ap.parse_args()
  if args.cmd == "record":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    record(args.out, args.suite, args.steps, [x for x in args.only.split(",") if x],
           args.data_dir)
  else:
    sys.exit(compare(args.ref, args.new, args.tol))


if __name__ == "__main__":
  main()
