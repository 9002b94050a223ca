"""grain pipelines: an endless, checkpointable, host-sharded train stream and ordered eval
batches.

Train: ``source -> host shard [p::P] -> shuffle(seed, reshuffled every epoch) -> repeat ->
random_map(transform, seed) -> drop unreadable -> batch(host batch)``. Everything before the
batch is random-access, so the iterator's whole state is one index: resuming restores it and
continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import numpy as np

Transform = Callable[[Any, np.random.Generator], Any]


class DataIterator:
  """Host-local numpy batches with ``get_state()`` / ``set_state()`` for exact resume."""

  def __init__(self, dataset: grain.IterDataset, sources: tuple = ()):
    self._dataset = dataset
    self._it = iter(dataset)
    self._sources = sources

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> Any:
    return next(self._it)

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  @property
  def num_skipped(self) -> int:
    """Unreadable records skipped so far by this host (since this process started)."""
    return sum(getattr(s, "num_skipped", 0) for s in self._sources)


def _skip_none(transform: Transform) -> Transform:
  def apply(example, rng):
    return None if example is None else transform(example, rng)
  return apply


def train_stream(source: Any, transform: Transform, seed: int, shuffle: bool = True
                 ) -> grain.MapDataset:
  """Endless per-example MapDataset of this host's shard (None where a record is unreadable)."""
  ds = grain.MapDataset.source(source)
  ds = ds[jax.process_index()::jax.process_count()]
  if shuffle:
    ds = ds.shuffle(seed=seed)
  return ds.repeat(None).random_map(_skip_none(transform), seed=seed + 1)


def batched(ds: grain.MapDataset, batch_size: int, num_threads: int = 2,
            prefetch: int = 8) -> grain.IterDataset:
  """Drops unreadable (None) examples, reads with threads, stacks ``batch_size`` examples."""
  ds = ds.filter(lambda x: x is not None)
  opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return ds.to_iter_dataset(opts).batch(batch_size, drop_remainder=True)


def train_iterator(source: Any, transform: Transform, *, batch_size: int, seed: int,
                   num_threads: int = 2, shuffle: bool = True) -> DataIterator:
  """The standard single-stream train iterator; ``batch_size`` is per host."""
  ds = batched(train_stream(source, transform, seed, shuffle), batch_size, num_threads)
  return DataIterator(ds, (source,))


def eval_batches(source: Any, transform: Callable[[Any], Any], batch_size: int
                 ) -> Iterator[tuple[Any, int]]:
  """Ordered pass over a whole split: yields (host-local batch, number of real rows).

  ``batch_size`` is global; each host takes a contiguous block of every global batch, so
  rows of the gathered global arrays are in dataset order. The last batch is padded by
  repeating its last example; use the count to drop the padding. Unreadable records are
  replaced by their predecessor's transform and counted by the source.
  """
  n = len(source)
  hosts, me = jax.process_count(), jax.process_index()
  per_host = batch_size // hosts
  last = None
  for start in range(0, n, batch_size):
    rows = []
    for k in range(per_host):
      i = min(start + me * per_host + k, n - 1)
      ex = source[i]
      last = transform(ex) if ex is not None else last
      rows.append(last)
    batch = jax.tree.map(lambda *xs: np.stack(xs), *rows)
    yield batch, min(batch_size, n - start)
