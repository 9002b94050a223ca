"""The tiny LVLM captioner (``configs/lvlm_shapes.py:tiny``) over seeds: how well its greedy
captions name the scene's objects, against chance.

  python bench/experiments/lvlm_captioner.py --data_dir DIR [--seeds 0 1 2] \\
      [--out docs/results/lvlm_captioner.md] [-- --config.key=value ...]

Each seed is one ``python -m bigvl.main`` run (reused when the same command already finished
with the same code, ``_runs.prepare_workdir``). Metrics come from the ``captions`` evaluator
on the first 128 test images: object recall (share of a scene's objects, colour + shape,
named), object precision (share of named objects that are in the scene), exact match with a
reference caption; "chance" scores every image with the caption generated for another image.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _runs import REPO, code_version, prepare_workdir  # bench/experiments/_runs.py

METRICS = [("object recall", "object_recall"), ("object precision", "object_precision"),
           ("exact match", "exact_match"), ("hallucinated captions", "hallucinated_captions")]


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--root", default="/tmp/bigvl/lvlm_captioner")
  ap.add_argument("--out", default=os.path.join(REPO, "docs/results/lvlm_captioner.md"))
  ap.add_argument("extra", nargs="*", help="--config.key=value overrides for every run")
  a = ap.parse_args()
  code = code_version()
  results, secs = [], []
  for seed in a.seeds:
    workdir = os.path.join(a.root, f"seed{seed}")
    cmd = ["-m", "bigvl.main", "--config", "configs/lvlm_shapes.py:tiny", "--workdir",
           workdir, f"--config.input.data_dir={a.data_dir}", f"--config.seed={seed}", *a.extra]
    t0 = time.time()
    if not prepare_workdir(workdir, cmd, code):
      subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
    secs.append(time.time() - t0)
    with open(os.path.join(workdir, "results.json")) as f:
      results.append(json.load(f))

  def col(key):
    return np.array([r[f"captions/{key}"] for r in results])

  lines = [f"# Tiny LVLM captioner on shapes_captions ({len(a.seeds)} seeds, {code})", "",
           f"Command: `python bench/experiments/lvlm_captioner.py --data_dir DIR --seeds "
           f"{' '.join(map(str, a.seeds))}{' -- ' + ' '.join(a.extra) if a.extra else ''}`",
           "", "Per seed: " + ", ".join(f"{s}: {t:.0f} s" for s, t in zip(a.seeds, secs,
                                                                          strict=True)),
           "", "| metric | model (mean ± std) | chance (mean ± std) | model - chance, paired "
           "(mean ± std) | seeds above chance |", "|---|---:|---:|---:|---:|"]
  for name, key in METRICS:
    m, c = col(key), col(f"chance_{key}")
    d = m - c
    better = int(np.sum(d > 0)) if key != "hallucinated_captions" else int(np.sum(d < 0))
    lines.append(f"| {name} | {m.mean():.3f} ± {m.std(ddof=1):.3f} | {c.mean():.3f} ± "
                 f"{c.std(ddof=1):.3f} | {d.mean():+.3f} ± {d.std(ddof=1):.3f} | "
                 f"{better}/{len(d)} |")
  lines += ["", "Per seed (recall / precision / exact): " + "; ".join(
      f"seed {s}: {r['captions/object_recall']:.3f} / {r['captions/object_precision']:.3f} / "
      f"{r['captions/exact_match']:.3f}" for s, r in zip(a.seeds, results, strict=True))]
  with open(a.out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
