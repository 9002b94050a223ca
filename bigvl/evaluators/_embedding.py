"""Embedding a whole eval split with an image-text task (shared by zero-shot and retrieval).

Uses only the declared task interface (``bigvl/tasks/base.py``): eval data of kind
``'image_text'`` (``{'image', 'tokens': [C, L], 'label'?}`` per example), the prediction
functions named by ``image_fn`` (default ``'embed_images'``: ``batch['image'] -> [B, E]``) and
``text_fn`` (default ``'embed_texts'``: ``batch['tokens'] [B, L] -> [B, E]``), and
``encode_texts`` for free text (zero-shot prompts).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import Reader, positive_int
from bigvl.data import pipeline
from bigvl.evaluators._split import read_eval_split
from bigvl.tasks.base import EvalView


def predict_split(fn: Any, params: Any, state: Any, source: Any, transform: Any,
                  batch_size: int, mesh: Mesh, inputs: tuple[str, ...] = ("image",),
                  carry: tuple[str, ...] = ("label",), desc: str | None = None
                  ) -> dict[str, np.ndarray]:
  """A jitted prediction function over every example of ``source`` (in order):
  ``{'out': fn(params, state, batch of inputs)[:N], <carry key>: [N]}`` (``carry``: row keys
  handed back as they are, e.g. the labels). ``fn`` may return a dict of arrays (then each of
  its keys is returned instead of ``out``). With ``desc``, a progress bar on stderr."""
  from bigvl.tools._common import progress

  outs: dict[str, list] = {}
  batches = pipeline.eval_batches(source, transform, batch_size)
  if desc:
    batches = progress(batches, -(-len(source) // batch_size), desc, unit="batch")
  for local, n in batches:
    batch = parallel.global_batch(local, mesh)
    pred = fn(params, state, {k: batch[k] for k in inputs})
    pred = pred if isinstance(pred, dict) else {"out": pred}
    for k, v in pred.items():
      outs.setdefault(k, []).append(np.asarray(parallel.to_host(v))[:n])
    for k in carry:
      if k in batch:
        outs.setdefault(k, []).append(np.asarray(parallel.to_host(batch[k]))[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


def embed_tokens(fn: Any, params: Any, state: Any, tokens: np.ndarray, batch_size: int,
                 mesh: Mesh, desc: str | None = None) -> np.ndarray:
  """``[N, E]``: a jitted text prediction function over token rows ``[N, L]`` (host-global,
  every host holds all rows), in whole global batches (the last padded by repeating its last
  row); each host feeds its block of every batch."""
  from bigvl.tools._common import progress

  n = len(tokens)
  pad = (-n) % batch_size
  tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, axis=0)])
  me, hosts = jax.process_index(), jax.process_count()
  per = batch_size // hosts
  steps = range(0, len(tokens), batch_size)
  if desc:
    steps = progress(steps, len(steps), desc, unit="batch")
  outs = []
  for i in steps:
    local = tokens[i:i + batch_size]
    batch = parallel.global_batch({"tokens": local[me * per:(me + 1) * per]}, mesh)
    outs.append(parallel.to_host(fn(params, state, batch)))
  return np.concatenate(outs)[:n]


class Head:
  """The first ``n`` records of a random-access source."""

  def __init__(self, source: Any, n: int):
    self._source, self._n = source, min(n, len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> Any:
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[i]


class SplitEmbedder:
  """Reads ``dataset`` (default: the task's), ``split``, ``batch_size``, ``num_captions``,
  ``image_fn``, ``text_fn``. ``num_examples`` (given by the caller): only the split's first
  that many examples."""

  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh, num_examples: int | None = None):
    self.task, self.mesh = task, mesh
    task.require_kind("image_text", cfg.path)
    split = read_eval_split(cfg, task, mesh)
    self.dataset, self.batch_size = split.dataset, split.batch_size
    self.source, self.info = split.source, split.info
    if num_examples is not None:
      self.source = Head(self.source, num_examples)
    self.num_captions = positive_int(cfg, "num_captions", 1)
    self._transform = task.eval_transform("image_text", num_captions=self.num_captions)
    self._img = jax.jit(task.predict_fn(cfg.typed("image_fn", str, "embed_images"),
                                        f"{cfg.path}.image_fn"))
    self._txt = jax.jit(task.predict_fn(cfg.typed("text_fn", str, "embed_texts"),
                                        f"{cfg.path}.text_fn"))

  def embed(self, params: Any, state: Any, texts: bool = True, source: Any = None,
            keep_inputs: bool = False) -> dict[str, np.ndarray]:
    """``{'zimg': [N, E], 'ztxt': [N, C, E], 'label': [N]}`` in dataset order; ``source``:
    other examples of the split's layout (random access) instead of the split;
    ``keep_inputs``: also the model inputs ``'image'`` and ``'tokens'`` (for figures)."""
    out: dict[str, list] = {"zimg": [], "ztxt": [], "label": []}
    source = self.source if source is None else source
    for local, n in pipeline.eval_batches(source, self._transform, self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      if keep_inputs:
        for k in ("image", "tokens"):
          out.setdefault(k, []).append(parallel.to_host(batch[k])[:n])
      out["zimg"].append(parallel.to_host(self._img(params, state, {"image": batch["image"]}))[:n])
      if texts:
        b, c, length = batch["tokens"].shape
        z = self._txt(params, state, {"tokens": batch["tokens"].reshape(b * c, length)})
        out["ztxt"].append(parallel.to_host(z).reshape(b, c, -1)[:n])
      if "label" in batch:
        out["label"].append(parallel.to_host(batch["label"])[:n])
    return {k: np.concatenate(v) for k, v in out.items() if v}

  def embed_texts(self, params: Any, state: Any, texts: list[str]) -> np.ndarray:
    """[len(texts), E] embeddings of free texts (padded to whole global batches)."""
    return embed_tokens(self._txt, params, state, self.task.encode_texts(texts)["tokens"],
                        self.batch_size, self.mesh)
