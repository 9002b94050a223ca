"""Every semi-supervised method x seeds on MNIST-5k with 100 labels; writes a markdown table.

  nice -n 5 env PYTHONPATH=. python bench/experiments/semisup_mnist.py \\
      --steps 1500 --seeds 0,1,2 --out docs/results/semisup_mnist.md

Each run is ``configs/semisup_mnist.py:<method>,tiny,steps=N`` (SmallCNN, 10 labels per class
drawn with the run's seed, test error on the 1,000 held-out images), trained in this process
with ``bigvl.train.train``; XLA's persistent compilation cache lets the 2nd and 3rd seed of a
method reuse the 1st one's compiled step. Per-run results are appended to ``<out>`` with
``.jsonl`` for ``.md``, each with its key: the run's full resolved config and the code version
(a hash of ``bigvl/`` and ``configs/``, ``_runs.code_version``). A rerun reuses only rows whose
key matches, so an interrupted sweep resumes where it stopped and a changed config or code
never reprints old rows (``--fresh`` starts over). The table's setup sentence is written from
the config that ran.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
from _runs import REPO, code_version  # bench/experiments/_runs.py

from bigvl.tasks.semisup_methods import METHODS


def parse_sets(items: list[str]) -> dict:
  """``['semisup.lambda_u=8', ...]`` -> ``{'semisup.lambda_u': 8, ...}`` (Python literals)."""
  out = {}
  for item in items:
    key, _, value = item.partition("=")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


def split_arm(arm: str) -> tuple[str, str]:
  """``'supervised+perturb=paper'`` -> ``('supervised', 'perturb=paper')``: an arm is a method
  plus extra config args (``+``-separated)."""
  method, _, extra = arm.partition("+")
  return method, extra.replace("+", ",")


def config_of(arm: str, seed: int, steps: int, sets: dict | None = None):
  from bigvl.config import load_sibling

  method, extra = split_arm(arm)
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist").get_config(
      ",".join(filter(None, (method, extra, "tiny", f"steps={steps}"))))
  for key, value in (sets or {}).items():
    only, _, key = key.rpartition(":")  # 'mean_teacher:semisup.lambda_u': that method only
    if only and only != method:
      continue
    if not key.startswith("semisup.") or key.split(".", 1)[1] in c.semisup:
      c.update_from_flattened_dict({key: value})  # a semisup knob only where the method has it
  c.seed = seed
  c.log_every = max(1, steps // CURVE_POINTS)
  c.ckpt_every = steps
  return c


def run_key(c, code: str) -> dict:
  """What makes a row reusable: the resolved config and the code version."""
  return {"config": json.loads(c.to_json_best_effort()), "code": code}


#: logged points per run: the curves of the supervised and the weighted unlabeled term.
CURVE_POINTS = 30
CURVE_KEYS = ("sup_loss", "unsup_loss", "w_u", "acc", "u_acc")


def read_curve(workdir: str) -> dict[str, list]:
  """``{'step': [...], 'sup_loss': [...], ...}`` from the run's ``metrics.jsonl`` (the
  training rows; keys a method does not log are left out)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if "sup_loss" in r]
  return {k: [r[k] for r in rows] for k in ("step", *CURVE_KEYS) if rows and k in rows[0]}


def run_one(arm: str, seed: int, steps: int, workroot: str, code: str, sets: dict) -> dict:
  from bigvl import train

  c = config_of(arm, seed, steps, sets)
  workdir = os.path.join(workroot, f"{arm}_s{seed}".replace("=", "-"))
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.perf_counter()
  res = train.train(c, workdir)
  out = {"method": arm, "seed": seed, "steps": steps, "seconds": time.perf_counter() - t0,
         "error": res["test/error"], "mu": c.semisup.get("mu", 0),
         "batch_size": c.input.batch_size, "key": run_key(c, code)}
  if "teacher/error" in res:  # Mean Teacher's second evaluator: its EMA teacher
    out["teacher_error"] = res["teacher/error"]
  out["curve"] = read_curve(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  return out


def _fmt(xs: list[float]) -> str:
  xs = 100 * np.asarray(xs)
  return f"{xs.mean():.2f} ± {xs.std(ddof=1) if len(xs) > 1 else 0.0:.2f}"


def setup_sentence(c) -> str:
  """The model, batch and optimizer of a run, read from its config."""
  m, o, sch = c.model, c.optim, c.schedule
  model = {"small_cnn": f"SmallCNN width {m.get('width')}, {m.get('stages')} stages",
           "wide_resnet": f"WRN-{m.get('depth')}-{m.get('width')}"}.get(m.name, m.name)
  end = sch.get("end_frac", 0.0)
  return (f"{model}; labeled batch {c.input.batch_size}, {o.name} lr {o.lr:g} "
          f"{sch.get('decay', 'cosine')} to {end:g}x, weight decay {o.get('wd', 0.0):g}")


def arm_order(arm: str) -> tuple[int, str]:
  """Arms in the registry's method order, a method's plain arm first."""
  method, extra = split_arm(arm)
  return (list(METHODS).index(method) if method in METHODS else len(METHODS), extra)


def paired(errs_by_seed: dict[int, float], base_by_seed: dict[int, float]) -> str:
  """``mean ± std (k of n)`` of ``100 (error - baseline error)`` over the seeds both have; k:
  the seeds where the arm had fewer errors."""
  seeds = sorted(set(errs_by_seed) & set(base_by_seed))
  if not seeds:
    return ""
  d = [100 * (errs_by_seed[s] - base_by_seed[s]) for s in seeds]
  sd = np.std(d, ddof=1) if len(d) > 1 else 0.0
  return f"{np.mean(d):+.2f} ± {sd:.2f} ({sum(x < 0 for x in d)} of {len(d)})"


def render(rows: list[dict], command: str, wall: float, setup: str, code: str,
           title: str | None = None) -> str:
  by = {}
  for r in rows:
    by.setdefault(r["method"], []).append(r)
  baselines = sorted((a for a in by if split_arm(a)[0] == "supervised"), key=arm_order)
  base_by_seed = {a: {r["seed"]: r["error"] for r in by[a]} for a in baselines}
  head = " | ".join(f"paired vs `{a}` (seeds better)" for a in baselines)
  lines = [f"| arm | test error % (mean ± std) | per seed | {head} | unlabeled / step | "
           "s / run |",
           "|---|---:|---|" + "---:|" * len(baselines) + "---:|---:|"]
  for arm in sorted(by, key=arm_order):
    rs = sorted(by[arm], key=lambda r: r["seed"])
    for key, name in (("error", arm), ("teacher_error", f"{arm} (teacher)")):
      if key not in rs[0]:
        continue
      errs = {r["seed"]: r[key] for r in rs}
      cols = " | ".join("" if a == arm else paired(errs, base_by_seed[a]) for a in baselines)
      lines.append(f"| `{name}` | {_fmt(list(errs.values()))} | "
                   f"{', '.join(f'{100 * e:.1f}' for e in errs.values())} | {cols} | "
                   f"{rs[0]['mu'] * rs[0]['batch_size']} | "
                   f"{np.mean([r['seconds'] for r in rs]):.0f} |")
  seeds = sorted({r["seed"] for r in rows})
  return "\n".join([
      "# " + (title or "Semi-supervised MNIST, 100 labels: every method, same backbone, "
              "same steps"),
      "",
      f"Generated by `bench/experiments/semisup_mnist.py` at code version `{code}`. Command "
      "(repository root):",
      "",
      "```",
      command,
      "```",
      "",
      f"MNIST-5k (`embedded:mnist5k`: 4,000 train / 1,000 test images), 100 labels (10 per "
      f"class, drawn with the run's seed; the other 3,900 train images unlabeled), "
      f"`configs/semisup_mnist.py:<method>,tiny` ({setup}) for {rows[0]['steps']} steps; "
      f"seeds {', '.join(map(str, seeds))}. Test error on the 1,000 test images after the "
      f"last step; mean ± sample std over seeds. Machine: {platform.processor() or 'x86_64'} "
      f"CPU shared with other jobs (2 cores), Python {platform.python_version()}; whole sweep "
      f"{wall / 60:.1f} min.",
      "",
      *lines,
      "",
      "An arm is `<method>[+<config arg>...]` (`configs/semisup_mnist.py` args; `perturb=auto` "
      "gives the Pi-model, Temporal Ensembling and Mean Teacher their papers' perturbations). "
      "`paired vs X`: the mean ± std over seeds of (arm - X) test error on the same seed (same "
      "labeled draw and data order), in points, and in how many seeds the arm had fewer "
      "errors. Discussion, the papers' perturbations and the digit-specific RandAugment op "
      "list: `docs/semisup.md`, section \"Result: MNIST, 100 labels\".",
      "",
  ])


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=1500)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--out", default=os.path.join(REPO, "docs", "results", "semisup_mnist.md"))
  ap.add_argument("--fresh", action="store_true")
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                  help="config overrides (a semisup.<knob> only where the method has it; "
                       "METHOD:KEY=VALUE for one method), e.g. mean_teacher:semisup.lambda_u=8")
  ap.add_argument("--title", default=None, help="the table's heading")
  args = ap.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.getLogger("absl").setLevel(logging.ERROR)
  import jax

  cache = os.path.join(tempfile.gettempdir(), "bigvl_semisup_xla_cache")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

  seeds = [int(s) for s in args.seeds.split(",")]
  methods = [m for m in args.methods.split(",") if m]
  jsonl = os.path.splitext(args.out)[0] + ".jsonl"
  if args.fresh and os.path.exists(jsonl):
    os.remove(jsonl)
  code = code_version()
  sets = parse_sets(args.set)
  keys = {(m, s): run_key(config_of(m, s, args.steps, sets), code)
          for s in seeds for m in methods}
  rows = []
  if os.path.exists(jsonl):
    with open(jsonl) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("key") == keys.get((r["method"], r["seed"]))]
  done = {(r["method"], r["seed"]) for r in rows}
  workroot = tempfile.mkdtemp(prefix="bigvl_semisup_")
  t0 = time.perf_counter()
  for seed in seeds:
    for m in methods:
      if (m, seed) in done:
        continue
      r = run_one(m, seed, args.steps, workroot, code, sets)
      print(f"SWEEP {m} seed {seed}: error {100 * r['error']:.2f}% "
            f"({r['seconds']:.0f}s)", flush=True)
      rows.append(r)
      with open(jsonl, "a") as f:
        f.write(json.dumps(r) + "\n")
  wall = sum(r["seconds"] for r in rows)
  command = ("nice -n 5 env PYTHONPATH=. python bench/experiments/semisup_mnist.py "
             + " ".join(a for a in sys.argv[1:] if a != "--fresh"))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    f.write(render(rows, command, wall, setup_sentence(config_of(methods[0], seeds[0],
                                                                 args.steps, sets)), code,
                   args.title))
  print(f"wrote {args.out} ({(time.perf_counter() - t0) / 60:.1f} min this call)")


if __name__ == "__main__":
  main()
