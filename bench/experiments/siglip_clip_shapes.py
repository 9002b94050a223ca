"""SigLIP vs CLIP on shapes_captions (the ``:tiny`` demo configs), as a markdown table.

  python bench/experiments/siglip_clip_shapes.py [--out docs/results/siglip_clip_shapes.md]

Each row is one ``python -m bigvl.main`` run in a fresh workdir (same seed, steps, model);
the table reports the final zero-shot accuracy and retrieval recall on the test split, the
chance levels, and the wall time of the whole command (dataset build included if needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _table import write_table  # bench/experiments/_table.py

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNS = [("SigLIP (sigmoid)", "configs/siglip_shapes.py:tiny"),
        ("CLIP (softmax)", "configs/clip_shapes.py:tiny")]


def run(config: str, workdir: str, extra: list[str]) -> tuple[dict, float]:
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "bigvl.main", "--config", config, "--workdir",
                  workdir, *extra], cwd=REPO, check=True)
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f), time.time() - t0


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.path.join(REPO, "docs/results/siglip_clip_shapes.md"))
  ap.add_argument("extra", nargs="*", help="--config.key=value overrides for every run")
  args = ap.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, config in RUNS:
      res, secs = run(config, os.path.join(tmp, name.split()[0]), args.extra)
      rows.append((name, config, res, secs))
  r0 = rows[0][2]
  lines = [
      "# SigLIP vs CLIP on shapes_captions (tiny)", "",
      "Command: `python bench/experiments/siglip_clip_shapes.py " + " ".join(args.extra) + "`",
      f"(2-core CPU; test split: {int(round(1 / r0['retrieval/chance_R@1']))} images x 5 "
      f"captions, {int(round(1 / r0['zeroshot/chance']))} zero-shot classes).", "",
      "| loss | config | zero-shot acc | i2t R@1 | t2i R@1 | i2t R@5 | t2i R@5 | wall |",
      "|---|---|---:|---:|---:|---:|---:|---:|"]
  for name, config, res, secs in rows:
    lines.append(
        f"| {name} | `{config}` | {100 * res['zeroshot/accuracy']:.1f}% | "
        f"{100 * res['retrieval/i2t_R@1']:.1f}% | {100 * res['retrieval/t2i_R@1']:.1f}% | "
        f"{100 * res['retrieval/i2t_R@5']:.1f}% | {100 * res['retrieval/t2i_R@5']:.1f}% | "
        f"{secs / 60:.1f} min |")
  write_table(lines + [""], r0, args.out)


if __name__ == "__main__":
  main()
