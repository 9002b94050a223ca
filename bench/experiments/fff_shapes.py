"""FFF vs plain SigLIP on near-duplicate data (``shapes_captions/dups``), as a markdown table.

  python bench/experiments/fff_shapes.py [--seeds 0 1] [--out docs/results/fff_shapes.md]
                                         [-- --config.key=value ...]

Rows: ``configs/fff_shapes.py:tiny,baseline`` (SigLIP, K = 1, no mining) and
``configs/fff_shapes.py:tiny`` (FFF: K = 5 captions per image + false-negative mining, each
image's positives normalised to total weight K), each a ``python -m bigvl.main`` run with the
same seed, steps, model and data order; ``--ablations`` adds FFF with the paper's weights (every
positive 1), K = 5 without mining, and mining with K = 1. With several seeds the table shows
mean +- std over seeds. Metrics on the clean test split (1000 independent scenes x 5 captions):
zero-shot accuracy (24 classes) and the standard retrieval Recall@K (only an image's own
captions are correct). ``--workdir`` keeps the runs, one directory per run config and seed; a
directory is reused only for the same command and code version (``_runs.py``), an unfinished
one resumes. The table names the code version it was made with.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
from _runs import REPO, code_version, prepare_workdir  # bench/experiments/_runs.py
from _table import write_table  # bench/experiments/_table.py

CONFIG = "configs/fff_shapes.py"
UNWEIGHTED = "--config.loss.mining.normalize=False"
RUNS = [("SigLIP baseline (K=1, no mining)", "tiny,baseline", []),
        ("FFF (K=5 + mining, positives normalised per image)", "tiny", [])]
ABLATIONS = [("FFF, paper's weights (K=5 + mining, every positive weighs 1)", "tiny",
              [UNWEIGHTED]),
             ("K=5 only (no mining)", "tiny", ["--config.loss.mining.source=none"]),
             ("mining only (K=1, every positive weighs 1)", "tiny,k=1", [UNWEIGHTED])]
METRICS = [("zero-shot acc", "zeroshot/accuracy"),
           ("i2t R@1", "retrieval/i2t_R@1"), ("t2i R@1", "retrieval/t2i_R@1"),
           ("i2t R@5", "retrieval/i2t_R@5"), ("t2i R@5", "retrieval/t2i_R@5"),
           ("i2t scene R@1", "retrieval/i2t_scene_R@1"),
           ("t2i scene R@1", "retrieval/t2i_scene_R@1")]


def run_one(arg: str, flags: list[str], seed: int, workdir: str, code: str) -> dict:
  """One training run; returns its final evals, its training throughput and the mean mined
  positives. A workdir that holds the finished run of the same command and code version is
  reused, an unfinished one resumes, anything else is cleared (``_runs.prepare_workdir``)."""
  cmd = [sys.executable, "-m", "bigvl.main", "--config", f"{CONFIG}:{arg}", "--workdir",
         workdir, f"--config.seed={seed}", *flags]
  print("+", " ".join(cmd[1:]), flush=True)
  if not prepare_workdir(workdir, cmd[1:], code):
    subprocess.run(cmd, cwd=REPO, check=True)
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  mined, speed = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("mined_per_image", 0) > 0:
        mined.append(rec["mined_per_image"])
      if rec.get("examples_per_s", 0) > 0:
        speed.append(rec["examples_per_s"])
  res["mined_per_image"] = float(np.mean(mined)) if mined else 0.0
  res["examples_per_s"] = float(np.mean(speed)) if speed else float("nan")
  return res


def slug(arg: str, flags: list[str]) -> str:
  """A workdir name that identifies the run's config (so that a reused workdir is that run)."""
  text = "_".join([arg] + [f.removeprefix("--config.") for f in flags])
  return re.sub(r"[^A-Za-z0-9=.-]+", "_", text)


def fmt(values: list[float], pct: bool = True) -> str:
  scale = 100 if pct else 1
  mean = scale * float(np.mean(values))
  if len(values) == 1:
    return f"{mean:.1f}"
  return f"{mean:.1f} ± {scale * float(np.std(values)):.1f}"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  ap.add_argument("--ablations", action="store_true")
  ap.add_argument("--out", default=os.path.join(REPO, "docs/results/fff_shapes.md"))
  ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temp dir)")
  ap.add_argument("extra", nargs="*", help="--config.key=value overrides for every run")
  args = ap.parse_args()
  runs = RUNS + (ABLATIONS if args.ablations else [])
  results: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
  code = code_version()
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    for seed in args.seeds:
      for name, arg, flags in runs:
        wd = os.path.join(root, f"{slug(arg, flags + args.extra)}_seed{seed}")
        results[name].append(run_one(arg, flags + args.extra, seed, wd, code))

  command = ("python bench/experiments/fff_shapes.py --seeds " +
             " ".join(map(str, args.seeds)) + (" --ablations" if args.ablations else "") +
             (" -- " + " ".join(args.extra) if args.extra else ""))
  first = results[runs[0][0]][0]
  metrics = [(m, key) for m, key in METRICS if key in first]  # scene R@1: only with scene_key
  lines = [
      "# FFF vs SigLIP on near-duplicate data (shapes_captions/dups, tiny)", "",
      f"Command: `{command}` (code version `{code}`)", "",
      f"Each row: `python -m bigvl.main --config {CONFIG}:<arg>` with the same seed, steps, "
      f"model, optimizer and data order; seeds {', '.join(map(str, args.seeds))}"
      + (" (mean ± std over seeds)" if len(args.seeds) > 1 else "") + ". Train split: half "
      "the scenes are copies of 100 prototypes; test split: "
      f"{int(round(1 / first['retrieval/chance_R@1']))} independent scenes x 5 captions, "
      f"{int(round(1 / first['zeroshot/chance']))} zero-shot classes; 2-core CPU, shared.", "",
      "| run | arg | " + " | ".join(m for m, _ in metrics) + " | mined / image | train ex/s |",
      "|---|---|" + "---:|" * (len(metrics) + 2)]
  for name, arg, flags in runs:
    rs = results[name]
    cells = [fmt([r[key] for r in rs]) for _, key in metrics]
    mined = fmt([r["mined_per_image"] for r in rs], pct=False)
    speed = f"{np.mean([r['examples_per_s'] for r in rs]):.0f}"
    shown = f"`{arg}`" + "".join(f" `{f}`" for f in flags)
    lines.append(f"| {name} | {shown} | " + " | ".join(cells) + f" | {mined} | {speed} |")
  base = results[runs[0][0]]
  lines += ["", "Paired with the baseline of the same seed (R@1 difference in points; seeds "
            "where it is > 0):", "", "| run | i2t R@1 | t2i R@1 |", "|---|---:|---:|"]
  for name, _, _ in runs[1:]:
    cells = []
    for key in ("retrieval/i2t_R@1", "retrieval/t2i_R@1"):
      d = [100 * (r[key] - b[key]) for r, b in zip(results[name], base, strict=True)]
      cells.append(f"{np.mean(d):+.1f} ({sum(x > 0 for x in d)} of {len(d)})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "All numbers in %, except mined / image: the mean number of mined extra "
            "positives per image and step once mining is on (of 128 x K texts); train ex/s: "
            "images per second on the shared 2-core CPU (K = 5 costs ~5x text-tower work)."]
  write_table(lines, first, args.out)


if __name__ == "__main__":
  main()
