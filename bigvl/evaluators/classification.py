"""Classification accuracy / error of a task's prediction function on a whole labeled split.

Uses only the declared task interface (``bigvl/tasks/base.py``): eval data of kind
``'image_label'`` (``{'image', 'label'}`` per example) and the prediction function named by
``predict_fn`` (default ``'logits'``: ``batch['image'] -> logits [B, K]``; e.g. Mean Teacher's
``'teacher_logits'``). Reports ``accuracy`` and ``error`` (= 1 - accuracy) over every example
of the split (the padding of the last batch is dropped).

Config (``config.evals.<name>``): ``type='classification'``, ``every``, ``dataset`` (default:
the task's), ``split`` (``'test'``), ``batch_size`` (global, 256), ``predict_fn``.
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
from bigvl.tasks.base import EvalView


class Evaluator:
  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.mesh = mesh
    task.require_kind("image_label", cfg.path)
    split = read_eval_split(cfg, task, mesh)
    self.batch_size, self.source = split.batch_size, split.source
    self._transform = task.eval_transform("image_label")
    name = cfg.typed("predict_fn", str, "logits")
    self._predict = jax.jit(task.predict_fn(name, f"{cfg.path}.predict_fn"))

  def predictions(self, params: Any, state: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class [N], labels [N])`` in dataset order."""
    preds, labels = [], []
    for local, n in pipeline.eval_batches(self.source, self._transform, self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      logits = self._predict(params, state, {"image": batch["image"]})
      preds.append(np.argmax(parallel.to_host(logits), -1)[:n])
      labels.append(parallel.to_host(batch["label"])[:n])
    return np.concatenate(preds), np.concatenate(labels)

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    preds, labels = self.predictions(params, state)
    acc = float(np.mean(preds == labels))
    return {"accuracy": acc, "error": 1.0 - acc}
