"""Shared by the experiment scripts: finish a markdown results table and write it."""

from __future__ import annotations

import os

import numpy as np


def write_lines(lines: list[str], out: str) -> None:
  """Writes the markdown ``lines`` to ``out`` (its directory made) and prints them."""
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def write_table(lines: list[str], result: dict, out: str) -> None:
  """Appends the chance levels of ``result`` (a run's ``results.json``) to ``lines``, writes
  them to ``out`` and prints them."""
  write_lines(lines + [f"Chance: zero-shot {100 * result['zeroshot/chance']:.1f}%, "
                       f"R@1 {100 * result['retrieval/chance_R@1']:.2f}%."], out)


def mean_std(v, scale: float = 100.0, digits: int = 1) -> str:
  """``mean ± std`` (sample std over seeds) of ``v`` times ``scale``; one value alone."""
  v = scale * np.asarray(v, np.float64)
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if len(v) > 1 else \
      f"{v[0]:.{digits}f}"


def paired(a, b, scale: float = 100.0, digits: int = 1) -> str:
  """The paired difference ``a - b`` over seeds: ``mean ± std (k/n)``, ``k`` the seeds where
  ``a`` is ahead."""
  d = scale * (np.asarray(a, np.float64) - np.asarray(b, np.float64))
  std = d.std(ddof=1) if len(d) > 1 else 0.0
  return f"{d.mean():+.{digits}f} ± {std:.{digits}f} ({int(np.sum(d > 0))}/{len(d)})"


def class_cells(results: list[dict], classes, prefix: str = "test/iou/") -> str:
  """``| a | b | ...`` cells: each class's IoU in %, averaged over the runs' ``results``."""
  return " | ".join(f"{100 * np.mean([r.get(prefix + c, 0.0) for r in results]):.1f}"
                    for c in classes)
