"""Classification accuracy / error of a task's prediction function on a whole labeled split.

Uses only the declared task interface (``bigvl/tasks/base.py``): eval data of kind
``'image_label'`` (``{'image', 'label'}`` per example) and the prediction function named by
``predict_fn`` (default ``'logits'``: ``batch['image'] -> logits [B, K]``; e.g. Mean Teacher's
``'teacher_logits'``). Reports ``accuracy`` and ``error`` (= 1 - accuracy) over every example
of the split (the padding of the last batch is dropped).

With ``confidence_threshold`` (tau) also ``confident_fraction`` (the share of examples whose
max softmax probability is >= tau) and ``confident_accuracy`` (the accuracy on those): how
trustworthy the pseudo-labels a method would draw at that threshold are (domain adaptation's
CLIV, FixMatch).

Config (``config.evals.<name>``): ``type='classification'``, ``every``, ``dataset`` (default:
the task's), ``split`` (``'test'``), ``batch_size`` (global, 256), ``predict_fn``,
``confidence_threshold`` (None).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, plots
from bigvl.config import ConfigError, Reader
from bigvl.data import pipeline
from bigvl.evaluators._confusion import confusion_matrix
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
    tau = cfg.get("confidence_threshold")
    if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float))
                            or not 0 <= tau <= 1):
      raise ConfigError(f"{cfg.path}.confidence_threshold must be in [0, 1], got {tau!r}")
    self.threshold = None if tau is None else float(tau)

  def predictions(self, params: Any, state: Any, with_confidence: bool = False):
    """``(predicted class [N], labels [N])`` in dataset order (and the max softmax
    probability ``[N]`` with ``with_confidence``)."""
    preds, labels, conf = [], [], []
    for local, n in pipeline.eval_batches(self.source, self._transform, self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      logits = np.asarray(parallel.to_host(self._predict(params, state,
                                                         {"image": batch["image"]})))[:n]
      preds.append(np.argmax(logits, -1))
      labels.append(parallel.to_host(batch["label"])[:n])
      z = np.exp(logits - logits.max(-1, keepdims=True))
      conf.append((z / z.sum(-1, keepdims=True)).max(-1))
    out = (np.concatenate(preds), np.concatenate(labels))
    return (*out, np.concatenate(conf)) if with_confidence else out

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    preds, labels, conf = self.predictions(params, state, with_confidence=True)
    acc = float(np.mean(preds == labels))
    out = {"accuracy": acc, "error": 1.0 - acc}
    if self.threshold is not None:
      sure = conf >= self.threshold
      out["confident_fraction"] = float(np.mean(sure))
      out["confident_accuracy"] = float(np.mean(preds[sure] == labels[sure])) if sure.any() \
          else 0.0
    return out

  def figures(self, params: Any, state: Any = None) -> dict[str, Any]:
    """``{'confusion'}``: the confusion matrix over the split."""
    preds, labels = self.predictions(params, state)
    n = int(max(preds.max(), labels.max())) + 1
    c = confusion_matrix(preds, labels, n, n, ignore_label=None).T  # [true, predicted]
    return {"confusion": plots.confusion_figure(c)}
