"""Wall-clock timing shared by the micro-benchmarks (bench/gemm.py, bench/attention.py)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], reps: int) -> float:
  """Median wall time of ``reps`` calls of ``fn`` (which must block until its work is done)
  after one untimed warm-up call (compilation, allocator, thread-pool start)."""
  fn()
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)
