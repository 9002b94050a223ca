"""Embedding a whole eval split with a two-tower task (shared by zero-shot and retrieval)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import Reader, positive_int
from bigvl.data import pipeline
from bigvl.evaluators._split import read_eval_split


class SplitEmbedder:
  """Reads ``dataset`` (default: the task's), ``split``, ``batch_size``, ``num_captions``."""

  def __init__(self, cfg: Reader, task: Any, mesh: Mesh):
    self.task, self.mesh = task, mesh
    split = read_eval_split(cfg, task, mesh)
    self.dataset, self.batch_size = split.dataset, split.batch_size
    self.source, self.info = split.source, split.info
    self.num_captions = positive_int(cfg, "num_captions", 1)
    self._img = jax.jit(task.embed_images)
    self._txt = jax.jit(task.embed_texts)

  def embed(self, params: Any, texts: bool = True) -> dict[str, np.ndarray]:
    """``{'zimg': [N, E], 'ztxt': [N, C, E], 'label': [N]}`` in dataset order."""
    out: dict[str, list] = {"zimg": [], "ztxt": [], "label": []}
    transform = lambda ex: self.task.transform.eval(ex, self.num_captions)
    for local, n in pipeline.eval_batches(self.source, transform, self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      out["zimg"].append(parallel.to_host(self._img(params, batch["image"]))[:n])
      if texts:
        b, c, length = batch["tokens"].shape
        z = self._txt(params, batch["tokens"].reshape(b * c, length))
        out["ztxt"].append(parallel.to_host(z).reshape(b, c, -1)[:n])
      if "label" in batch:
        out["label"].append(parallel.to_host(batch["label"])[:n])
    return {k: np.concatenate(v) for k, v in out.items() if v}

  def embed_texts(self, params: Any, texts: list[str]) -> np.ndarray:
    tokens = self.task.tokenizer.encode(texts, self.task.max_len)
    pad = (-len(tokens)) % self.batch_size
    tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, axis=0)])
    outs = []
    for i in range(0, len(tokens), self.batch_size):
      local = tokens[i:i + self.batch_size]
      me, hosts = jax.process_index(), jax.process_count()
      per = len(local) // hosts
      batch = parallel.global_batch(local[me * per:(me + 1) * per], self.mesh)
      outs.append(parallel.to_host(self._txt(params, batch)))
    return np.concatenate(outs)[: len(texts)]
