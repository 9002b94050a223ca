"""Few-shot classification by pre-training on base classes: cross-entropy (RFS, Tian et al.
2020) and Spatial Contrastive Learning (SCL: Ouali, Hudelot, Tami, "Spatial Contrastive
Learning for Few-Shot Classification", ECML-PKDD 2021), each optionally followed by a
self-distillation stage.

A batch holds ``B`` labeled images of the base (training) classes, each in ``V`` augmented
views (``input.views``, 2; default view pipeline :data:`VIEW_OPS`). The backbone (ResNet-12,
``bigvl.models.resnet12``) maps a view to a feature map ``F [h, w, c]``, its average ``g``
and logits ``W g`` over the base classes. With ``y`` the class, over all ``N = B V`` views::

    L = a_ce CE(W g, y) + a_s L_spatial + a_g L_global
        + a_kd T^2 KL(p_T(teacher) || p_T(student)) + a_f (2 - 2 cos(g, g_teacher))

* ``L_spatial`` (``method='scl'``): the supervised contrastive loss (Khosla et al. 2020) over
  the ``N`` views with temperature ``tau`` (0.1) and the *spatial* similarity of SCL: each map
  is projected by two-layer MLPs to queries, keys and values (``bigvl.models.resnet12``'s
  ``SpatialProjection``); the positions of map ``b`` are aligned to those of ``a`` by
  attention ``softmax(Q_a K_b^T / sqrt(d)) V_b`` and vice versa; the similarity is the mean
  over positions of the cosine between each map's values and the other's aligned values
  (``bigvl.losses.spatial_contrastive``).
* ``L_global`` (``fewshot.global_weight`` > 0): the same SupCon on the cosine of projected
  pooled features (the optional global term).
* Distillation (``fewshot.teacher``: a finished run of this task): the student (same
  architecture, fresh init) matches the frozen teacher's softened predictions (KD, temperature
  ``T`` 4) and its pooled features (contrastive distillation ``2 - 2 cos``), the born-again
  stage of RFS / SCL; the official stage uses ``a_ce = 0, a_kd = 1, a_f = 10`` and one view
  (``configs/scl_shapes.py:teacher=...`` sets these).

DropBlock's rate (``bigvl.models.resnet12``) is annealed over ``dropblock_warmup_steps``
(official: 40,000 forward passes).

``method='ce'`` is the baseline: the same backbone, views, steps and optimizer, ``a_s = a_g
= 0``. At test time nothing of the base classes is used: ``bigvl.evaluators.fewshot`` fits a
logistic regression on the frozen features of unseen classes, episode by episode.

Knobs (``config.fewshot``, :data:`DEFAULTS`; the official code's defaults): ``ce_weight``
(1), ``spatial_weight`` (1), ``global_weight`` (0: the official runs do not use it),
``temperature`` (0.1), ``proj_dim`` (80: q / k / v and global projection size),
``teacher`` ('': no distillation), ``kd_weight`` (1), ``kd_temperature`` (4),
``feature_distill_weight`` (10) (the last three with a teacher), ``dropblock_warmup_steps``
(40,000), ``spatial_bins`` (2: the evaluation's spatial features).

Prediction functions (eval kind ``'image_label'``, images resized to ``input.image_size``):
``global`` (pooled features ``[B, c]``), ``spatial`` (the feature map max-pooled to
``spatial_bins x spatial_bins`` as the official evaluation, ``[B, 2, 2, c]``; the evaluator
flattens it) and ``logits`` (base classes).

Config read: ``method``, ``fewshot.*``, ``input.{dataset, data_dir, train_split ('train'),
label_key ('label'), classes (the base classes: label ids or names; default every class of
the split), image_size, batch_size, num_threads, views (2), transforms (one view's op
specs), mean, std}``, ``model.*`` (``resnet12`` knobs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import checkpoint, parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int, read_knobs
from bigvl.data import pipeline, sources, streams, transforms
from bigvl.data.labels import class_ids, class_subset
from bigvl.losses import consistency as C
from bigvl.losses import spatial_contrastive as S
from bigvl.models import resnet12
from bigvl.tasks import base

METHODS = ("ce", "scl")
#: ``config.fewshot`` knobs and defaults (module docstring).
DEFAULTS: dict[str, Any] = {
    "ce_weight": 1.0, "spatial_weight": 1.0, "global_weight": 0.0, "temperature": 0.1,
    "proj_dim": 80, "teacher": "", "kd_weight": 1.0, "kd_temperature": 4.0,
    "feature_distill_weight": 10.0, "dropblock_warmup_steps": resnet12.DROPBLOCK_WARMUP_STEPS,
    "spatial_bins": 2,
}
#: one view's default augmentation: flip, translation (random crop with reflect padding),
#: two RandAugment ops that keep hue (no solarize / posterize / equalize / colour: colour is a
#: class attribute of ``shapes_fewshot``), small Cutout.
VIEW_OPS = [{"op": "strong", "flip": True, "max_translate": 0.125, "num_ops": 2,
             "ops": ["identity", "autocontrast", "brightness", "contrast", "sharpness", "rotate",
                     "shear_x", "shear_y", "translate_x", "translate_y"],
             "cutout_max_fraction": 0.25}]


class Task(base.Task):
  progress_keys = ("ce_loss", "spatial_loss", "global_loss", "kd_loss", "acc")
  eval_kinds = ("image_label",)

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    self.method = check_choice("config.method", config.typed("method", str), METHODS)
    k = read_knobs(config.get("fewshot"), DEFAULTS, "config.fewshot")
    for name in ("ce_weight", "spatial_weight", "global_weight", "kd_weight",
                 "feature_distill_weight"):
      if k[name] < 0:
        raise ConfigError(f"config.fewshot.{name} must be >= 0, got {k[name]}")
    for name in ("temperature", "kd_temperature"):
      if k[name] <= 0:
        raise ConfigError(f"config.fewshot.{name} must be > 0, got {k[name]}")
    for name in ("proj_dim", "spatial_bins", "dropblock_warmup_steps"):
      if k[name] < 1:
        raise ConfigError(f"config.fewshot.{name} must be >= 1, got {k[name]}")
    if self.method == "ce":
      k["spatial_weight"] = k["global_weight"] = 0.0
    self.k = k
    self.teacher_dir = (checkpoint.step_dir(k["teacher"], "config.fewshot.teacher")
                        if k["teacher"] else None)

    inp = config.input
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.label_key = inp.typed("label_key", str, "label")
    self.image_size = inp.typed("image_size", int, None)
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.num_views = positive_int(inp, "views", 2)
    self.mean, self.std = base.read_mean_std(inp)
    self.source, info = sources.get_source(
        self.dataset, inp.typed("train_split", str, "train"), self.data_dir)
    labels = streams.read_labels(self.source, self.label_key)
    chosen = inp.get("classes")
    if chosen is not None:  # base classes of a split that holds more (CIFAR-FS, FC100)
      try:
        names = info.features[self.label_key].names if info is not None else None
      except (KeyError, AttributeError):
        names = None
      try:
        ids = class_ids(chosen, names, f"{inp.path}.classes")
      except ValueError as e:
        raise ConfigError(str(e)) from None
      keep = class_subset(labels, ids)
      self.source = streams.IndexedSubset(self.source, keep)
      labels = labels[keep]
    #: the base classes (dataset label ids, sorted) -> logits 0..K-1
    self.classes = np.unique(labels[labels >= 0])
    if len(self.classes) < 2:
      raise ConfigError(f"config.input: {self.dataset} has {len(self.classes)} classes in its "
                        f"train split; few-shot pre-training needs at least 2")
    self._label_map = np.full(int(self.classes.max()) + 1, -1, np.int64)
    self._label_map[self.classes] = np.arange(len(self.classes))
    view = inp.typed("transforms", (list, tuple), VIEW_OPS)
    self.train_transform = transforms.build(
        [*self._resize(), {"op": "views", "args": [list(view)] * self.num_views, "out": "image"},
         {"op": "cast", "key": self.label_key, "out": "label"},
         {"op": "keep", "keys": ["image", "label"]}], where=f"{inp.path}.transforms")
    m = config.model
    self.model = registry.load("models", m.typed("name", str, "resnet12"), "model").from_config(
        m, num_classes=len(self.classes))
    self.spatial = resnet12.SpatialProjection(out_dim=k["proj_dim"])
    self.global_head = resnet12.GlobalProjection(out_dim=k["proj_dim"])

  def _resize(self) -> list[dict]:
    return [] if self.image_size is None else [{"op": "resize", "size": self.image_size}]

  # --- host side ----------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.source)

  @property
  def examples_per_step(self) -> int:
    return self.batch_size * self.num_views

  def train_data(self, seed: int) -> pipeline.DataIterator:
    label_map = self._label_map

    def transform(example, rng):
      out = self.train_transform(example, rng)
      return {"image": out["image"], "label": np.int32(label_map[int(out["label"])])}
    return pipeline.train_iterator(self.source, transform, batch_size=self.host_batch,
                                   seed=seed, num_threads=self.num_threads)

  def pretrained(self) -> list[checkpoint.WeightSource]:
    """With ``fewshot.teacher``: the teacher's backbone and BN statistics into
    ``state['teacher']`` (read once, after a fresh init)."""
    if self.teacher_dir is None:
      return []
    what = "config.fewshot.teacher"
    return [checkpoint.WeightSource(path=self.teacher_dir, dst="extra/teacher/params",
                                    src="params/net", what=what),
            checkpoint.WeightSource(path=self.teacher_dir, dst="extra/teacher/batch_stats",
                                    src="extra/batch_stats", what=what)]

  # --- pure functions -----------------------------------------------------------------------
  def normalize(self, images: jax.Array) -> jax.Array:
    return (images.astype(jnp.float32) / 255.0 - self.mean) / self.std

  @property
  def contrastive(self) -> bool:
    return self.k["spatial_weight"] > 0 or self.k["global_weight"] > 0

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    x = self.normalize(batch["image"][:, 0])
    r_net, r_sp, r_gl = jax.random.split(rng, 3)
    variables = self.model.init(r_net, x, train=False)
    out = self.model.apply(variables, x, train=False)
    params = {"net": variables["params"]}
    if self.k["spatial_weight"] > 0:
      params["spatial"] = self.spatial.init(r_sp, out["feature_map"])["params"]
    if self.k["global_weight"] > 0:
      params["global"] = self.global_head.init(r_gl, out["features"])["params"]
    state: dict[str, Any] = {"batch_stats": variables["batch_stats"]}
    if self.teacher_dir is not None:
      # placeholders of the right shapes: pretrained() fills them on a fresh run; a resumed
      # run restores them from its own checkpoint
      state["teacher"] = jax.tree.map(jnp.zeros_like, {
          "params": variables["params"], "batch_stats": variables["batch_stats"]})
    return params, state

  def loss(self, params, state, batch, rng, step):
    k = self.k
    images, y = batch["image"], batch["label"]
    b, v = images.shape[:2]
    x = self.normalize(images.reshape(b * v, *images.shape[2:]))
    yv = jnp.repeat(y, v)
    out, upd = self.model.apply({"params": params["net"], "batch_stats": state["batch_stats"]},
                                x, train=True, mutable=["batch_stats"], rngs={"dropout": rng},
                                dropblock_scale=resnet12.dropblock_scale(
                                    step, k["dropblock_warmup_steps"]))
    logits = out["logits"]
    ce = jnp.mean(C.cross_entropy(logits, yv))
    metrics = {"ce_loss": ce,
               "acc": jnp.mean((jnp.argmax(logits, -1) == yv).astype(jnp.float32))}
    total = k["ce_weight"] * ce
    if k["spatial_weight"] > 0:
      q, key, val = self.spatial.apply({"params": params["spatial"]}, out["feature_map"])
      sim = S.pairwise_spatial_similarity(q, key, val)
      sp = S.supcon_loss(sim, yv, k["temperature"])
      metrics["spatial_loss"] = sp
      total = total + k["spatial_weight"] * sp
    if k["global_weight"] > 0:
      z = self.global_head.apply({"params": params["global"]}, out["features"])
      gl = S.supcon_loss(S.global_similarity(z), yv, k["temperature"])
      metrics["global_loss"] = gl
      total = total + k["global_weight"] * gl
    if self.teacher_dir is not None:
      t = self.model.apply(state["teacher"], x, train=False)
      kd = S.kd_loss(logits, t["logits"], k["kd_temperature"])
      fd = S.contrastive_distill_loss(out["features"], t["features"])
      metrics.update(kd_loss=kd, feature_distill_loss=fd)
      total = total + k["kd_weight"] * kd + k["feature_distill_weight"] * fd
    return total, (metrics, {**state, "batch_stats": upd["batch_stats"]})

  # --- evaluation ---------------------------------------------------------------------------
  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``global`` ``[B, c]``, ``spatial`` ``[B, h, w, c]``, ``logits`` ``[B, K]`` (eval mode)
    of ``batch['image']`` (uint8)."""
    def forward(params, state, batch):
      return self.model.apply({"params": params["net"], "batch_stats": state["batch_stats"]},
                              self.normalize(batch["image"]), train=False)
    bins = self.k["spatial_bins"]
    return {"global": lambda p, s, b: forward(p, s, b)["features"],
            "spatial": lambda p, s, b: resnet12.adaptive_max_pool(
                forward(p, s, b)["feature_map"], bins),
            "logits": lambda p, s, b: forward(p, s, b)["logits"]}

  def eval_transform(self, kind: str, label_key: str | None = None, **opts: Any
                     ) -> base.EvalTransform:
    """``'image_label'``: ``{'image': uint8 (resized to input.image_size), 'label': int32}``
    (``label_key``: default the input's)."""
    if kind not in self.eval_kinds or opts:
      return super().eval_transform(kind, **opts)
    key = label_key or self.label_key
    t = transforms.build([*self._resize(), {"op": "cast", "key": key, "out": "label"},
                          {"op": "keep", "keys": ["image", "label"]}])
    return lambda ex: t(ex)
