"""The split an evaluator reads: ``dataset`` (default: the task's), ``split`` (``'test'``) and
the global ``batch_size`` (256, divisible by the mesh's data axes)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import Reader, positive_int
from bigvl.data import sources


@dataclasses.dataclass
class EvalSplit:
  dataset: str
  split: str
  batch_size: int
  source: Any
  info: Any


def read_eval_split(cfg: Reader, task: Any, mesh: Mesh) -> EvalSplit:
  dataset = cfg.typed("dataset", str, task.dataset)
  split = cfg.typed("split", str, "test")
  batch_size = positive_int(cfg, "batch_size", 256)
  parallel.batch_size_per_host(batch_size, mesh, f"{cfg.path}.batch_size")
  source, info = sources.get_source(dataset, split, task.data_dir)
  return EvalSplit(dataset, split, batch_size, source, info)
