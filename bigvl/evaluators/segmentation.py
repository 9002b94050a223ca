"""Semantic segmentation of a whole split: pixel accuracy, mean accuracy and mIoU, supervised or
(``hungarian=True``) of unsupervised clusters matched 1-to-1 to the classes.

Uses only the declared task interface (``bigvl/tasks/base.py``): eval data of kind
``'image_mask'`` (``{'image': uint8 [H, W, C], 'mask': int32 [H, W]}`` per example, every
example of the split the same H, W; mask value ``ignore_label`` = a pixel that is not scored)
and the prediction function named by ``predict_fn`` (default ``'logits'``: ``batch['image'] ->
float [B, H, W, K]`` scores per pixel, K classes or K clusters). The predicted label of a pixel
is the argmax of its K scores (taken on the device).

One confusion matrix is accumulated over every example of the split (the padding of the last
batch dropped; ``max_examples``: only the first that many), ``C[p, t]`` = the number of scored
pixels (truth != ``ignore_label``) predicted ``p`` whose truth is ``t``: rows are predictions,
columns the truth (:func:`confusion_matrix`). A truth value outside ``[0, num_classes)`` that
is not ``ignore_label`` is a ``ValueError``. With T = ``num_classes``, rows ``p >= T`` (a
prediction that is no class) count as wrong for every class. The metrics
(:func:`scores`), with ``TP_c = C[c, c]``, ``T_c = sum_p C[p, c]`` (pixels of class c),
``P_c = sum_t C[c, t]`` (pixels predicted c, for c < T):

* ``pixel_accuracy`` = ``sum_c TP_c / sum C``;
* ``mean_accuracy`` = mean over the classes present in the truth (``T_c > 0``) of
  ``TP_c / T_c``;
* ``miou`` = mean over the classes with ``U_c = T_c + P_c - TP_c > 0`` of ``TP_c / U_c``:
  classes absent from both the truth and the prediction are left out, as in the standard
  PASCAL VOC protocol;
* ``iou/<class name>`` = ``TP_c / U_c`` for each class with ``U_c > 0`` (the others are left
  out of the results too, as they are of ``miou``).

**Hungarian matching** (``hungarian=True``; the unsupervised segmentation protocol of IIC, Ji
et al. 2019, and of Ouali et al. 2020, "Autoregressive Unsupervised Image Segmentation"): the
confusion is ``K x T`` (predicted cluster, true class); :func:`hungarian_assignment` solves
``scipy.optimize.linear_sum_assignment`` on its negation, the 1-to-1 cluster -> class map
with the most matched pixels. When K > T the K - T clusters left unassigned map to no class:
their pixels count as wrong (:func:`remap_confusion` sums them into an extra row T). The
metrics above are then those of the remapped predictions, plus ``num_clusters_used``: the
clusters predicted on at least one scored pixel. A caller with numpy label maps gets the same
numbers from ``m = mapping[pred]; m[m < 0] = T; scores(confusion_matrix(m, truth, T + 1, T,
ignore_label))``.

**Overlays**: when the loop passes ``step`` and ``workdir`` (``writes_outputs = True``), process
0 writes the split's first ``num_overlays`` examples to
``<workdir>/segmentation/<eval name>/step_<step>_<i>.png`` (atomically): a strip input | truth
| prediction (after the Hungarian map), label maps in the fixed :func:`palette` (ignored truth
pixels black, a prediction mapped to no class white, 1-channel images gray), each panel
enlarged by an integer nearest-neighbour factor to at least 96 pixels tall.

Config (``config.evals.<name>``): ``type='segmentation'``, ``every``, ``dataset`` (default: the
task's), ``split`` (``'test'``), ``batch_size`` (global, 256), ``predict_fn`` (``'logits'``),
``num_classes`` (default: K of the predictions; needed when clusters != classes),
``ignore_label`` (255), ``hungarian`` (False), ``class_names`` (default: the class indices),
``num_overlays`` (4; 0 = none), ``max_examples`` (None: the whole split).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, plots
from bigvl.config import ConfigError, Reader, positive_int
from bigvl.data import pipeline
from bigvl.evaluators._confusion import confusion_matrix
from bigvl.evaluators._embedding import Head
from bigvl.evaluators._split import read_eval_split
from bigvl.tasks.base import EvalView

#: the colour of a truth pixel that is not scored (``ignore_label``).
IGNORE_COLOR = (0, 0, 0)
#: the colour of a prediction that is no class (a cluster the Hungarian map left unassigned).
NO_CLASS_COLOR = (255, 255, 255)
#: overlay panels are enlarged (nearest neighbour, integer factor) to at least this height.
MIN_PANEL_HEIGHT = 96


# --- metrics (pure numpy) ------------------------------------------------------------------
def hungarian_assignment(confusion: np.ndarray) -> np.ndarray:
  """The 1-to-1 map prediction -> class with the most matched pixels: ``mapping[p]`` (int64
  ``[P]``) is the class of cluster ``p``, -1 where unassigned (P > T leaves P - T clusters
  unassigned; P < T leaves T - P classes without a cluster). ``confusion`` is ``[P, T]``
  (:func:`confusion_matrix`); solved by ``scipy.optimize.linear_sum_assignment(-confusion)``."""
  from scipy.optimize import linear_sum_assignment

  confusion = np.asarray(confusion)
  if confusion.ndim != 2:
    raise ValueError(f"a confusion matrix is [P, T], got shape {confusion.shape}")
  rows, cols = linear_sum_assignment(-confusion.astype(np.float64))
  mapping = np.full(confusion.shape[0], -1, np.int64)
  mapping[rows] = cols
  return mapping


def remap_confusion(confusion: np.ndarray, mapping: np.ndarray) -> np.ndarray:
  """The ``[T + 1, T]`` confusion of the mapped predictions: row ``t < T`` sums the rows of the
  clusters mapped to class ``t``, row ``T`` those of the clusters mapped to none (-1)."""
  confusion, mapping = np.asarray(confusion, np.int64), np.asarray(mapping, np.int64)
  num_pred, num_true = confusion.shape
  if mapping.shape != (num_pred,) or ((mapping < -1) | (mapping >= num_true)).any():
    raise ValueError(f"mapping must be [{num_pred}] of classes in [-1, {num_true}), got "
                     f"{mapping.tolist()}")
  out = np.zeros((num_true + 1, num_true), np.int64)
  np.add.at(out, np.where(mapping < 0, num_true, mapping), confusion)
  return out


def scores(confusion: np.ndarray, class_names: Sequence[str] | None = None
           ) -> dict[str, float]:
  """``pixel_accuracy``, ``mean_accuracy``, ``miou`` and ``iou/<class name>`` (see the module
  docstring) of a ``[P, T]`` confusion (rows predictions, columns truth; square, or with rows
  ``>= T`` for predictions that are no class). ``class_names``: T names (default the
  indices)."""
  c = np.asarray(confusion, np.int64)
  if c.ndim != 2:
    raise ValueError(f"a confusion matrix is [P, T], got shape {c.shape}")
  num_pred, num_true = c.shape
  names = [str(i) for i in range(num_true)] if class_names is None else list(class_names)
  if len(names) != num_true:
    raise ValueError(f"{len(names)} class names for {num_true} classes")
  total = int(c.sum())
  if total == 0:
    raise ValueError("no scored pixel (every truth pixel is ignore_label)")
  k = min(num_pred, num_true)
  tp = np.zeros(num_true, np.int64)
  tp[:k] = np.diagonal(c)[:k]
  in_truth = c.sum(0)
  in_pred = np.zeros(num_true, np.int64)
  in_pred[:k] = c[:k].sum(1)
  union = in_truth + in_pred - tp
  present, scored = in_truth > 0, union > 0
  iou = tp[scored] / union[scored]
  out = {"pixel_accuracy": float(tp.sum() / total),
         "mean_accuracy": float(np.mean(tp[present] / in_truth[present])),
         "miou": float(np.mean(iou))}
  for name, v in zip(np.asarray(names, object)[scored], iou, strict=True):
    out[f"iou/{name}"] = float(v)
  return out


# --- overlays -------------------------------------------------------------------------------
def kmeans_centres(x: np.ndarray, k: int, seed: int, iters: int = 50) -> np.ndarray:
  """``[k, D]`` centres of Lloyd's k-means on ``x [N, D]`` with k-means++ seeding (Arthur &
  Vassilvitskii 2007) from ``seed``: the pixel-colour clustering baseline of unsupervised
  segmentation (assign each pixel to its nearest centre, then score like any clustering:
  :func:`confusion_matrix` -> :func:`hungarian_assignment` -> :func:`remap_confusion`)."""
  x = np.asarray(x, np.float64)
  rng = np.random.default_rng(seed)
  centres = x[rng.choice(len(x), 1)]
  for _ in range(k - 1):
    d = ((x[:, None] - centres[None]) ** 2).sum(-1).min(1)
    centres = np.concatenate([centres, x[rng.choice(len(x), 1, p=d / d.sum())]])
  for _ in range(iters):
    assign = nearest_centre(x, centres)
    centres = np.stack([x[assign == j].mean(0) if np.any(assign == j) else centres[j]
                        for j in range(k)])
  return centres


def nearest_centre(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """``[N]`` the index of each row of ``x`` 's nearest centre (squared Euclidean)."""
  return np.argmin(((np.asarray(x, np.float64)[:, None] - centres[None]) ** 2).sum(-1), axis=1)


def palette(n: int) -> np.ndarray:
  """uint8 ``[n, 3]``: the colour of label ``c`` is the PASCAL VOC colour map's entry ``c + 1``
  (bits of ``c + 1`` spread over R, G, B from the high bits down), so every label has its
  own colour, none black (:data:`IGNORE_COLOR`) or white (:data:`NO_CLASS_COLOR`) for
  ``n < 2**24 - 1``."""
  out = np.zeros((n, 3), np.int64)
  for label in range(n):
    v = label + 1
    for j in range(8):
      for ch in range(3):
        out[label, ch] |= ((v >> ch) & 1) << (7 - j)
      v >>= 3
  return out.astype(np.uint8)


def colorize(labels: np.ndarray, ignore_label: int | None = None) -> np.ndarray:
  """uint8 ``[..., 3]``: :func:`palette` colours of a label map; pixels equal to
  ``ignore_label`` black, negative labels (no class) white."""
  labels = np.asarray(labels, np.int64)
  ignore = np.zeros(labels.shape, bool) if ignore_label is None else labels == ignore_label
  shown = np.where(ignore, -1, labels)
  colors = palette(max(int(shown.max(initial=-1)) + 1, 1))
  out = colors[np.clip(shown, 0, None)]
  out[shown < 0] = NO_CLASS_COLOR
  out[ignore] = IGNORE_COLOR
  return out


def overlay(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, ignore_label: int | None
            ) -> np.ndarray:
  """uint8 ``[h * s, 3 * w * s, 3]``: input | truth | prediction, each enlarged ``s = ceil(96 /
  h)`` times (nearest neighbour; 1 if ``h >= 96``). ``image``: ``[h, w, C]`` (1 or 2 channels:
  the first shown gray; else the first three as RGB), values clipped to [0, 255]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  image = np.clip(image, 0, 255).astype(np.uint8)
  image = np.repeat(image[..., :1], 3, -1) if image.shape[-1] < 3 else image[..., :3]
  panels = [image, colorize(truth, ignore_label), colorize(pred)]
  s = max(1, math.ceil(MIN_PANEL_HEIGHT / image.shape[0]))
  strip = np.concatenate(panels, axis=1)
  return np.repeat(np.repeat(strip, s, 0), s, 1)


def write_png(path: str, rgb: np.ndarray) -> None:
  """Writes a uint8 ``[H, W, 3]`` image atomically (temporary file + ``os.replace``)."""
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(tmp, format="PNG")
  os.replace(tmp, path)


# --- the evaluator ---------------------------------------------------------------------------
class Evaluator:
  #: the loop passes ``step`` and ``workdir`` to :meth:`run` (overlays are written there).
  writes_outputs = True

  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.mesh, self.path = mesh, cfg.path
    self.name = cfg.path.rsplit(".", 1)[-1]
    task.require_kind("image_mask", cfg.path)
    split = read_eval_split(cfg, task, mesh)
    self.batch_size, self.source = split.batch_size, split.source
    max_examples = positive_int(cfg, "max_examples", None)
    if max_examples is not None:
      self.source = Head(self.source, max_examples)
    self._transform = task.eval_transform("image_mask")
    fn = task.predict_fn(cfg.typed("predict_fn", str, "logits"), f"{cfg.path}.predict_fn")

    def labels(params, state, batch):
      out = fn(params, state, batch)
      if out.ndim != 4:
        raise ValueError(f"{cfg.path}: the prediction function must return scores [B, H, W, "
                         f"K], got shape {out.shape}")
      return jnp.argmax(out, -1).astype(jnp.int32), jnp.array(out.shape, jnp.int32)

    self._predict = jax.jit(labels)
    self.num_classes = positive_int(cfg, "num_classes", None)
    self.ignore_label = cfg.typed("ignore_label", int, 255)
    self.hungarian = cfg.typed("hungarian", bool, False)
    names = cfg.get("class_names")
    if names is not None:
      if (not isinstance(names, (list, tuple)) or not names
          or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ConfigError(f"{cfg.path}.class_names must be a list of distinct non-empty "
                          f"strings, got {names!r}")
      names = list(names)
    self.class_names = names
    self.num_overlays = cfg.typed("num_overlays", int, 4)
    if self.num_overlays < 0:
      raise ConfigError(f"{cfg.path}.num_overlays must be >= 0, got {self.num_overlays}")
    if self.num_classes is not None:
      self._check_classes(self.num_classes, ConfigError)

  def _check_classes(self, num_classes: int, error: type[Exception]) -> None:
    if self.class_names is not None and len(self.class_names) != num_classes:
      raise error(f"{self.path}.class_names has {len(self.class_names)} names for "
                  f"{num_classes} classes")
    if 0 <= self.ignore_label < num_classes:
      raise error(f"{self.path}.ignore_label={self.ignore_label} is one of the {num_classes} "
                  f"classes")

  def confusion(self, params: Any, state: Any, num_keep: int = 0
                ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """``(C [K, num_classes], [(image, mask, predicted label map)] of the first ``num_keep``
    examples)``: the confusion of the raw predictions (clusters before any matching)."""
    conf, kept = None, []
    for local, n in pipeline.eval_batches(self.source, self._transform, self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      pred, shape = self._predict(params, state, {"image": batch["image"]})
      pred, shape = parallel.to_host(pred)[:n], parallel.to_host(shape)
      mask = parallel.to_host(batch["mask"])[:n]
      if pred.shape != mask.shape:
        raise ValueError(f"{self.path}: predictions {tuple(shape)} do not match the masks "
                         f"{mask.shape[1:]} per example")
      if conf is None:
        num_pred = int(shape[-1])
        num_classes = self.num_classes or num_pred
        self._check_classes(num_classes, ValueError)
        conf = np.zeros((num_pred, num_classes), np.int64)
      try:
        conf += confusion_matrix(pred, mask, *conf.shape, self.ignore_label)
      except ValueError as e:
        raise ValueError(f"{self.path}: {e}") from None
      if len(kept) < num_keep:
        images = parallel.to_host(batch["image"])[:n]
        kept += list(zip(images, mask, pred, strict=True))[:num_keep - len(kept)]
    if conf is None:
      raise ValueError(f"{self.path}: the split has no examples")
    return conf, kept

  def _matched(self, conf: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(confusion [classes (+1), classes], cluster -> class map or None)``: Hungarian
    matched for unsupervised models, else as predicted."""
    if not self.hungarian:
      return conf, None
    mapping = hungarian_assignment(conf)
    return remap_confusion(conf, mapping), mapping

  def _overlays(self, kept: list, mapping: np.ndarray | None) -> list[np.ndarray]:
    return [overlay(image, mask, mapping[pred] if mapping is not None else pred,
                    self.ignore_label) for image, mask, pred in kept]

  def run(self, params: Any, state: Any = None, step: int | None = None,
          workdir: str | None = None) -> dict[str, float]:
    write = workdir is not None and step is not None and self.num_overlays > 0
    conf, kept = self.confusion(params, state, self.num_overlays if write else 0)
    matched, mapping = self._matched(conf)
    out = scores(matched, self.class_names)
    if self.hungarian:
      out["num_clusters_used"] = float(np.count_nonzero(conf.sum(1)))
    if write and jax.process_index() == 0:
      folder = os.path.join(workdir, "segmentation", self.name)
      for i, strip in enumerate(self._overlays(kept, mapping)):
        write_png(os.path.join(folder, f"step_{int(step)}_{i}.png"), strip)
    return out

  def figures(self, params: Any, state: Any = None) -> dict[str, Any]:
    """``{'overlays'}``: the first ``num_overlays`` (at least 1) examples as input | truth |
    prediction strips, and ``{'confusion'}``: the pixel confusion matrix (after Hungarian
    matching for unsupervised models)."""
    conf, kept = self.confusion(params, state, max(self.num_overlays, 1))
    matched, mapping = self._matched(conf)  # [predicted (+ none), true]
    n = matched.shape[1]
    names = self.class_names or [str(c) for c in range(n)]
    if matched.shape[0] > n:  # clusters matched to no class: a "none" prediction column
      names = [*names, "none"]
    true_pred = np.zeros((len(names), len(names)), np.int64)
    true_pred[:n, :matched.shape[0]] = matched.T
    return {"overlays": plots.image_strips(self._overlays(kept, mapping),
                                           "input | truth | prediction"),
            "confusion": plots.confusion_figure(true_pred, names, "pixels")}
