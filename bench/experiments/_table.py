"""Shared by the experiment scripts: finish a markdown results table and write it."""

from __future__ import annotations

import os


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
