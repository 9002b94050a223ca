"""Classification accuracy / error of a classifier task on a whole labeled split.

The task gives ``predict(params, state, images, which) -> logits [N, K]`` and ``predictors``
(the names ``which`` takes, the trained model first, e.g. ``('student', 'teacher')`` for Mean
Teacher), plus ``dataset``, ``data_dir``, ``image_key``, ``label_key``. Reports ``accuracy``
and ``error`` (= 1 - accuracy) of the first predictor and ``<which>_accuracy`` /
``<which>_error`` of the others, over every example of the split (the padding of the last
batch is dropped).

Config (``config.evals.<name>``): ``type='classification'``, ``every``, ``dataset`` (default:
the task's), ``split`` (``'test'``), ``batch_size`` (global, 256).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import Reader
from bigvl.data import pipeline
from bigvl.evaluators._split import read_eval_split


class Evaluator:
  def __init__(self, cfg: Reader, task: Any, mesh: Mesh):
    self.task, self.mesh = task, mesh
    split = read_eval_split(cfg, task, mesh)
    self.batch_size, self.source = split.batch_size, split.source
    self.predictors = tuple(task.predictors)
    self._predict = jax.jit(task.predict, static_argnames="which")

  def _transform(self, ex: dict) -> dict:
    return {"image": np.asarray(ex[self.task.image_key]),
            "label": np.int32(ex[self.task.label_key])}

  def predictions(self, params: Any, state: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({which: predicted class [N]}, labels [N])`` in dataset order."""
    preds: dict[str, list] = {w: [] for w in self.predictors}
    labels = []
    for local, n in pipeline.eval_batches(self.source, self._transform, self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      for which in self.predictors:
        logits = self._predict(params, state, batch["image"], which=which)
        preds[which].append(np.argmax(parallel.to_host(logits), -1)[:n])
      labels.append(parallel.to_host(batch["label"])[:n])
    return {w: np.concatenate(p) for w, p in preds.items()}, np.concatenate(labels)

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    preds, labels = self.predictions(params, state)
    out = {}
    for i, which in enumerate(self.predictors):
      acc = float(np.mean(preds[which] == labels))
      prefix = "" if i == 0 else f"{which}_"
      out[f"{prefix}accuracy"] = acc
      out[f"{prefix}error"] = 1.0 - acc
    return out

