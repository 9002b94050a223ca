"""Choosing the labeled subset of a train split (semi-supervised benchmarks, stratified
held-out splits).

``labeled_indices(labels, num_labels, seed)`` is dataset-agnostic: it sees only the label array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def labeled_indices(labels: np.ndarray, num_labels: int, seed: int) -> np.ndarray:
  """Seeded class-balanced choice of ``num_labels`` positions: ``num_labels / K`` per class.

  ``K`` is the number of distinct values in ``labels``; ``num_labels`` must be a multiple of
  it (as in the SSL benchmarks: 40 / 250 / 4000 labels on CIFAR-10). Returns sorted int64
  indices into ``labels``; the same ``(labels, num_labels, seed)`` gives the same indices, and
  a larger ``num_labels`` with the same seed gives a superset per class.
  """
  labels = np.asarray(labels)
  classes = np.unique(labels)
  if num_labels <= 0 or num_labels % len(classes):
    raise ValueError(f"num_labels={num_labels} must be a positive multiple of {len(classes)}")
  per_class = num_labels // len(classes)
  rng = np.random.default_rng(seed)
  picks = []
  for c in classes:
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"class {c} has {len(members)} examples < {per_class} requested")
    picks.append(members[rng.permutation(len(members))[:per_class]])
  return np.sort(np.concatenate(picks)).astype(np.int64)


def class_ids(classes: Sequence[int | str], names: Sequence[str] | None, where: str
              ) -> np.ndarray:
  """A config's class list (label ids, or names of the dataset's ClassLabel ``names``) as
  sorted unique int64 ids; an unknown name or a negative id is a ``ValueError`` naming
  ``where``."""
  out = []
  for c in classes:
    if isinstance(c, str):
      if names is None or c not in names:
        raise ValueError(f"{where}: class {c!r} is not a class name of the dataset")
      out.append(list(names).index(c))
    elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0:
      out.append(int(c))
    else:
      raise ValueError(f"{where}: classes are label ids (ints >= 0) or names, got {c!r}")
  if not out:
    raise ValueError(f"{where}: the class list is empty")
  return np.unique(np.asarray(out, np.int64))


def class_subset(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """Sorted int64 positions of ``labels`` whose class is in ``classes`` (the records a
  few-shot split restricted to some classes reads)."""
  return np.flatnonzero(np.isin(np.asarray(labels), classes)).astype(np.int64)
