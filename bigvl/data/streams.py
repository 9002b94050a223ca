"""Several train streams in one checkpointable iterator, and indexed subsets of a source.

Semi-supervised training reads two streams at different batch sizes (``B`` labeled and
``mu * B`` unlabeled examples per step). Each is an ordinary ``pipeline.train_stream`` +
``pipeline.batched`` grain dataset with its own seed; :class:`ZipIterator` steps them
together and its state is the dict of their states, so a resumed run continues both exactly.

:class:`IndexedSubset` is a random-access view of some records of a source whose examples
carry their position in the view as ``index`` (Temporal Ensembling keeps one accumulator row
per unlabeled example); it works the same over bundled arrays and TFDS data sources.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np


class IndexedSubset:
  """``view[i] = {**source[indices[i]], 'index': i}`` (``None`` where the record is)."""

  def __init__(self, source: Any, indices: Sequence[int] | np.ndarray):
    self._source = source
    self.indices = np.asarray(indices, np.int64)
    if self.indices.ndim != 1:
      raise ValueError(f"indices must be 1-D, got shape {self.indices.shape}")
    if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(source)):
      raise ValueError(f"indices out of range for a source of {len(source)} records")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int) -> Any:
    i = int(i)
    ex = self._source[int(self.indices[i])]
    if ex is None:
      return None
    return {**ex, "index": i}

  @property
  def num_skipped(self) -> int:
    return getattr(self._source, "num_skipped", 0)


def read_labels(source: Any, key: str = "label") -> np.ndarray:
  """Every record's ``key`` field, in order, as int64 ``[N]`` (reads the whole source once;
  an unreadable record gets -1)."""
  out = np.empty(len(source), np.int64)
  for i in range(len(source)):
    ex = source[i]
    out[i] = -1 if ex is None else int(ex[key])
  return out


class ZipIterator:
  """Steps named grain ``IterDataset``s together: ``next(it) -> {name: batch}``.

  The same interface as ``pipeline.DataIterator`` (``get_state`` / ``set_state`` /
  ``num_skipped``); the state is ``{name: that stream's state}``.
  """

  def __init__(self, datasets: Mapping[str, grain.IterDataset], sources: tuple = ()):
    if not datasets:
      raise ValueError("ZipIterator needs at least one stream")
    self._its = {name: iter(ds) for name, ds in datasets.items()}
    self._sources = sources

  def __iter__(self) -> ZipIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    return {name: next(it) for name, it in self._its.items()}

  def get_state(self) -> dict:
    return {name: it.get_state() for name, it in self._its.items()}

  def set_state(self, state: dict) -> None:
    missing = set(self._its) - set(state)
    if missing:
      raise ValueError(f"iterator state lacks streams {sorted(missing)}; has {sorted(state)}")
    for name, it in self._its.items():
      it.set_state(state[name])

  @property
  def num_skipped(self) -> int:
    """Unreadable records skipped so far by this host, over all streams' sources."""
    return sum(getattr(s, "num_skipped", 0) for s in self._sources)
