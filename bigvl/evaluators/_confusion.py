"""The confusion matrix every evaluator that draws or scores one uses (segmentation pixels,
zero-shot and classification examples)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_pred: int, num_true: int,
                     ignore_label: int | None = 255) -> np.ndarray:
  """``C[p, t]`` (int64 ``[num_pred, num_true]``): the number of pixels predicted ``p`` with
  truth ``t``, over the pixels whose truth is not ``ignore_label`` (None: all pixels).

  ``pred`` and ``truth`` are integer label maps of one shape (any shape). A scored truth value
  outside ``[0, num_true)`` or a prediction outside ``[0, num_pred)`` is a ``ValueError``."""
  pred, truth = np.asarray(pred), np.asarray(truth)
  if pred.shape != truth.shape:
    raise ValueError(f"predictions {pred.shape} and truth {truth.shape} differ in shape")
  if num_pred < 1 or num_true < 1:
    raise ValueError(f"num_pred and num_true must be >= 1, got {num_pred}, {num_true}")
  keep = np.ones(truth.shape, bool) if ignore_label is None else truth != ignore_label
  t = truth[keep].astype(np.int64).ravel()
  p = pred[keep].astype(np.int64).ravel()
  bad = (t < 0) | (t >= num_true)
  if bad.any():
    raise ValueError(f"truth labels {sorted(set(np.unique(t[bad]).tolist()))[:10]} are outside "
                     f"[0, {num_true}) and not ignore_label={ignore_label}")
  bad = (p < 0) | (p >= num_pred)
  if bad.any():
    raise ValueError(f"predicted labels {sorted(set(np.unique(p[bad]).tolist()))[:10]} are "
                     f"outside [0, {num_pred})")
  counts = np.bincount(p * num_true + t, minlength=num_pred * num_true)
  return counts.astype(np.int64).reshape(num_pred, num_true)
