"""Semi-supervised semantic segmentation by Cross-Consistency Training (Ouali, Hudelot, Tami
2020, "Semi-Supervised Semantic Segmentation with Cross-Consistency Training", CVPR).

A shared encoder ``h`` and a main decoder ``g`` are trained on labeled images; ``K``
auxiliary decoders ``g_a^k``, each fed a *perturbed* encoder output of an unlabeled image,
must agree with the main decoder's prediction on the clean output (the cluster assumption
holds better in the encoder's output than in the input, so that is where CCT perturbs)::

    L = L_s + w(t) L_u (+ w_w L_w)
    L_s = 1/|P_l| sum_{labeled pixels} CE(g(h(x_l)), y)              (ignore_label excluded)
    L_u = 1/K sum_k 1/|P_u| sum_{pixels} 1/C || softmax(g_a^k(p_k(h(x_u))))
                                               - sg(softmax(g(h(x_u)))) ||^2
    w(t) = w_max exp(-5 (1 - t / T_r)^2) for t < T_r, w_max after (``rampup_fraction`` x steps)

With ``cct.confidence_threshold = tau > 0`` (the official code's ``confidence_masking``, off by
default there, 0.5 when on) ``L_u`` averages only over the pixels whose main prediction has
``max_c softmax >= tau`` (none: 0).

``p_k`` is decoder ``k``'s perturbation (``bigvl.models.perturbations``): I-VAT (the VAT
direction of the main decoder, computed on the features; ``bigvl.losses.consistency``'s power
iteration), spatial DropOut, G-Cutout, Con-Msk, Obj-Msk (these three read the main decoder's
prediction), F-Drop, F-Noise. ``cct.aux`` gives how many decoders of each kind (the official
defaults: 30 decoders, I-VAT 2, DropOut 6, G-Cutout 6, Con-Msk 2, Obj-Msk 2, F-Drop 6, F-Noise
6). The encoder gets gradients from every term: the aux decoders' agreement is what shapes the
representation. The supervised baseline is ``method='supervised'``: the same model and labeled
stream, no unlabeled data.

**Weak labels** (``cct.weak_weight > 0``; CCT Sec. 3.3): unlabeled images that carry
image-level labels (``input.weak_labels_key``: the ids of the object classes present, class
``id + 1`` in the mask) give each aux decoder a pixel-level pseudo-label to fit with CE,
``L_w = 1/K sum_k CE(g_a^k(p_k(z)), y_p)``. The paper takes ``y_p`` from class activation maps
of a separately trained classifier; ours are the main decoder's own prediction restricted to
background + the present classes, kept where that restricted prediction's probability is at
least ``cct.weak_threshold`` (the same role: image labels prune the classes a pixel may take).

Task state: ``batch_stats``. Evaluation: eval kind ``'image_mask'`` (``{'image': uint8
[S, S, C], 'mask': int32 [S, S]}``, both resized to ``input.image_size``, the mask nearest);
prediction function ``'logits'`` (the main decoder, ``[B, S, S, num_classes]``) for the
``segmentation`` evaluator.

Config read: ``method`` (``cct`` | ``supervised``), ``seed``, ``cct.*`` (:data:`DEFAULTS`),
``input.{dataset, data_dir, labeled_split, unlabeled_split, num_labels, label_seed,
num_classes, class_names, ignore_label, image_size, batch_size, unlabeled_batch_size,
num_threads, flip, max_translate, mean, std, image_key, mask_key, weak_labels_key,
transforms, unlabeled_transforms}``, ``model.*`` (``segmentation``), ``total_steps``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int, read_knobs
from bigvl.data import pipeline, sources, streams, transforms
from bigvl.losses import consistency as C
from bigvl.models import perturbations as P
from bigvl.tasks import base

METHODS = ("cct", "supervised")
#: ``config.cct`` knobs; defaults are the official code's (``configs/config.json``).
DEFAULTS: dict[str, Any] = {
    "aux": {"vat": 2, "dropout": 6, "cutout": 6, "context_mask": 2, "object_mask": 2,
            "feature_drop": 6, "feature_noise": 6},
    "unsup_weight": 30.0, "rampup_fraction": 0.1,
    "vat_xi": 1e-6, "vat_eps": 2.0, "drop_rate": 0.5, "erase": 0.4, "noise_uniform": 0.3,
    "feature_drop_low": 0.7, "feature_drop_high": 0.9,
    "weak_weight": 0.0, "weak_threshold": 0.0, "confidence_threshold": 0.0,
}


def read_cct_knobs(r: Reader | None) -> dict[str, Any]:
  """``config.cct`` over :data:`DEFAULTS`, range-checked."""
  k = read_knobs(r, DEFAULTS, "config.cct")
  for kind, n in k["aux"].items():
    if not isinstance(n, int) or n < 0:
      raise ConfigError(f"config.cct.aux.{kind} must be an int >= 0, got {n!r}")
  for name in ("unsup_weight", "vat_xi", "vat_eps", "noise_uniform", "weak_weight"):
    if k[name] < 0:
      raise ConfigError(f"config.cct.{name} must be >= 0, got {k[name]}")
  for name in ("rampup_fraction", "erase", "feature_drop_low", "feature_drop_high",
               "weak_threshold", "confidence_threshold"):
    if not 0 <= k[name] <= 1:
      raise ConfigError(f"config.cct.{name} must be in [0, 1], got {k[name]}")
  if not 0 <= k["drop_rate"] < 1:
    raise ConfigError(f"config.cct.drop_rate must be in [0, 1), got {k['drop_rate']}")
  if k["feature_drop_low"] > k["feature_drop_high"]:
    raise ConfigError("config.cct.feature_drop_low must be <= feature_drop_high")
  return k


def masked_pixel_ce(logits: jax.Array, labels: jax.Array, ignore_label: int) -> jax.Array:
  """``sum_{valid} CE / max(#valid, 1)`` over ``logits [..., C]`` and ``labels [...]``; a
  pixel is valid when its label is not ``ignore_label``."""
  valid = labels != ignore_label
  ce = C.cross_entropy(logits, jnp.where(valid, labels, 0))
  return jnp.sum(ce * valid) / jnp.maximum(jnp.sum(valid), 1)


def _seeds(seed: int, n: int) -> list[int]:
  return [int(s % (2**31 - 1)) for s in np.random.SeedSequence(seed).generate_state(n)]


class Task(base.Task):
  progress_keys = ("sup_loss", "unsup_loss", "w_u", "pixel_acc")
  eval_kinds = ("image_mask",)

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    self.method = check_choice("config.method", config.typed("method", str, "cct"), METHODS)
    self.k = read_cct_knobs(config.get("cct"))
    self.total_steps = config.get("total_steps")
    if not isinstance(self.total_steps, int) or self.total_steps <= 0:
      raise ConfigError("task cct needs config.total_steps (the ramp-up follows it)")
    seed = config.typed("seed", int, 0)
    inp = config.input
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.image_key = inp.typed("image_key", str, "image")
    self.mask_key = inp.typed("mask_key", str, "mask")
    self.num_classes = positive_int(inp, "num_classes")
    self.ignore_label = inp.typed("ignore_label", int, 255)
    if 0 <= self.ignore_label < self.num_classes:
      raise ConfigError(f"config.input.ignore_label={self.ignore_label} is a class id")
    self.image_size = positive_int(inp, "image_size")
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.flip = inp.typed("flip", bool, True)
    self.max_translate = float(inp.typed("max_translate", (float, int), 0.125))
    self.mean, self.std = base.read_mean_std(inp)

    lab_split = inp.typed("labeled_split", str, "train")
    self.train_source, _ = sources.get_source(self.dataset, lab_split, self.data_dir)
    n = len(self.train_source)
    num_labels = positive_int(inp, "num_labels", None)
    label_seed = inp.typed("label_seed", int, seed)
    if num_labels is not None and num_labels > n:
      raise ConfigError(f"config.input.num_labels={num_labels} > the {n} examples of split "
                        f"{lab_split!r}")
    order = np.random.default_rng(label_seed).permutation(n)
    self.labeled_idx = np.sort(order[:num_labels]) if num_labels else np.arange(n)
    self.labeled = streams.IndexedSubset(self.train_source, self.labeled_idx)

    self.weak = self.k["weak_weight"] > 0 and self.method == "cct"
    self.weak_key = inp.typed("weak_labels_key", str, "labels")
    self.unlabeled = None
    if self.method == "cct":
      unl_split = inp.typed("unlabeled_split", str, lab_split)
      if unl_split == lab_split:
        self.unlabeled_source = self.train_source
        rest = np.setdiff1d(np.arange(n), self.labeled_idx)
      else:
        self.unlabeled_source, _ = sources.get_source(self.dataset, unl_split, self.data_dir)
        rest = np.arange(len(self.unlabeled_source))
      if not len(rest):
        raise ConfigError("task cct: no unlabeled images (every train image is labeled); "
                          "set input.num_labels or input.unlabeled_split")
      self.unlabeled = streams.IndexedSubset(self.unlabeled_source, rest)
      self.unlabeled_batch_size = positive_int(inp, "unlabeled_batch_size", self.batch_size)
      self.host_unlabeled_batch = parallel.batch_size_per_host(
          self.unlabeled_batch_size, mesh, "config.input.unlabeled_batch_size")

    labeled, unlabeled = self._default_transforms()
    self.labeled_transform = transforms.build(
        inp.typed("transforms", (list, tuple), labeled), where=f"{inp.path}.transforms")
    self.unlabeled_transform = transforms.build(
        inp.typed("unlabeled_transforms", (list, tuple), unlabeled),
        where=f"{inp.path}.unlabeled_transforms") if self.unlabeled is not None else None

    self.aux_kinds = tuple(kind for kind in P.KINDS for _ in range(self.k["aux"][kind])
                           ) if self.method == "cct" else ()
    if self.method == "cct" and not self.aux_kinds:
      raise ConfigError("config.cct.aux: method 'cct' needs at least one auxiliary decoder")
    m = config.model
    self.model = registry.load("models", m.typed("name", str), "model").from_config(
        m, num_classes=self.num_classes, num_aux=len(self.aux_kinds))

  def _image_ops(self) -> list:
    """Copies ``input.image_key`` to ``image`` when it is another key."""
    return [] if self.image_key == "image" else [{"op": "copy", "args": [{self.image_key:
                                                                            "image"}]}]

  def _default_transforms(self) -> tuple[list, list]:
    """Labeled: ``{'image' uint8 [S, S, C], 'mask' uint8 [S, S, 1]}`` resized (mask nearest)
    then flipped / translated together (``weak``: a reflected pixel keeps its label).
    Unlabeled: the image alone, the same way (+ the weak labels as a multi-hot
    ``[num_classes - 1]`` when ``cct.weak_weight > 0``)."""
    weak = {"flip": self.flip, "max_translate": self.max_translate}
    mask = [] if self.mask_key == "mask" else [{"op": "copy", "args": [{self.mask_key:
                                                                         "mask"}]}]
    labeled = [*self._image_ops(), *mask,
               {"op": "resize", "size": self.image_size, "keys": ["image", "mask"]},
               {"op": "weak", **weak, "keys": ["image", "mask"]},
               {"op": "keep", "keys": ["image", "mask"]}]
    unlabeled = [*self._image_ops(), {"op": "resize", "size": self.image_size},
                 {"op": "weak", **weak}, {"op": "keep", "keys": ["image"]}]
    if self.weak:
      unlabeled[-1:] = [{"op": "multi_hot", "key": self.weak_key, "out": "weak",
                         "num": self.num_classes - 1},
                        {"op": "keep", "keys": ["image", "weak"]}]
    return labeled, unlabeled

  # --- host side ----------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.labeled)

  @property
  def examples_per_step(self) -> int:
    return self.batch_size + (self.unlabeled_batch_size if self.unlabeled is not None else 0)

  def train_data(self, seed: int) -> streams.ZipIterator:
    s = _seeds(seed, 2)
    ds = {"labeled": pipeline.batched(pipeline.train_stream(
        self.labeled, self.labeled_transform, s[0]), self.host_batch, self.num_threads)}
    srcs = (self.train_source,)
    if self.unlabeled is not None:
      ds["unlabeled"] = pipeline.batched(pipeline.train_stream(
          self.unlabeled, self.unlabeled_transform, s[1]), self.host_unlabeled_batch,
          self.num_threads)
      srcs += (self.unlabeled_source,) if self.unlabeled_source is not self.train_source \
          else ()
    return streams.ZipIterator(ds, srcs)

  # --- pure functions -----------------------------------------------------------------------
  def normalize(self, images: jax.Array) -> jax.Array:
    return (images.astype(jnp.float32) / 255.0 - self.mean) / self.std

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    x = self.normalize(batch["labeled"]["image"])
    variables = self.model.init(rng, x, train=False)
    return variables["params"], {"batch_stats": variables["batch_stats"]}

  def _apply(self, params, method, *args, **kw):
    return self.model.apply({"params": params}, *args, method=method, **kw)

  def _perturb(self, kind: str, params, z, main_logits, pred, rng):
    k = self.k
    if kind == "vat":
      def decode(features):
        return self._apply(params, "decode", features)
      return z + C.vat_perturbation(decode, z, rng, xi=k["vat_xi"], eps=k["vat_eps"],
                                    logits=main_logits)
    if kind == "dropout":
      return P.spatial_dropout(z, rng, k["drop_rate"])
    if kind == "cutout":
      return P.guided_cutout(z, pred, rng, self.num_classes, k["erase"])
    if kind == "context_mask":
      return P.context_masking(z, pred)
    if kind == "object_mask":
      return P.object_masking(z, pred)
    if kind == "feature_drop":
      return P.feature_dropout(z, rng, k["feature_drop_low"], k["feature_drop_high"])
    if kind == "feature_noise":
      return P.feature_noise(z, rng, k["noise_uniform"])
    raise ValueError(kind)

  def _weak_targets(self, main_logits, weak):
    """Pseudo-labels of the weak-label term (module docstring) and their validity."""
    allowed = jnp.concatenate([jnp.ones_like(weak[:, :1]), weak], axis=-1) > 0  # [B, C]
    restricted = jnp.where(allowed[:, None, None, :], main_logits, -jnp.inf)
    probs = jax.nn.softmax(restricted, axis=-1)
    labels = jnp.argmax(probs, axis=-1)
    valid = jnp.max(probs, axis=-1) >= self.k["weak_threshold"]
    return jax.lax.stop_gradient(jnp.where(valid, labels, self.ignore_label))

  def loss(self, params, state, batch, rng, step):
    lab = batch["labeled"]
    x_l, y = self.normalize(lab["image"]), lab["mask"]
    y = (y[..., 0] if y.ndim == 4 else y).astype(jnp.int32)
    b = x_l.shape[0]
    unl = batch.get("unlabeled")
    x = x_l if unl is None else jnp.concatenate([x_l, self.normalize(unl["image"])])
    z, upd = self.model.apply({"params": params, "batch_stats": state["batch_stats"]}, x,
                              train=True, method="encode", mutable=["batch_stats"])
    logits = self._apply(params, "decode", z)
    sup = masked_pixel_ce(logits[:b], y, self.ignore_label)
    valid = y != self.ignore_label
    acc = jnp.sum((jnp.argmax(logits[:b], -1) == y) * valid) / jnp.maximum(jnp.sum(valid), 1)
    metrics = {"sup_loss": sup, "pixel_acc": acc}
    new_state = {**state, "batch_stats": upd["batch_stats"]}
    if unl is None:
      return sup, (metrics, new_state)
    z_u, main_u = z[b:], logits[b:]
    target = jax.lax.stop_gradient(jax.nn.softmax(main_u, axis=-1))
    tau = self.k["confidence_threshold"]
    sure = (jnp.max(target, axis=-1) >= tau).astype(jnp.float32) if tau > 0 else None
    pred = P.labels_at(jax.lax.stop_gradient(main_u), z_u.shape[1:3])
    weak = self._weak_targets(main_u, unl["weak"]) if self.weak else None
    rngs = jax.random.split(rng, len(self.aux_kinds))
    unsup, weak_loss, per_kind = 0.0, 0.0, {}
    for i, kind in enumerate(self.aux_kinds):
      aux = self._apply(params, "decode_aux", self._perturb(kind, params, z_u, main_u, pred,
                                                             rngs[i]), i)
      per_pixel = C.mse(jax.nn.softmax(aux, axis=-1), target)
      term = jnp.mean(per_pixel) if sure is None else (
          jnp.sum(per_pixel * sure) / jnp.maximum(jnp.sum(sure), 1.0))
      per_kind.setdefault(kind, []).append(term)
      unsup = unsup + term / len(self.aux_kinds)
      if weak is not None:
        weak_loss = weak_loss + masked_pixel_ce(aux, weak, self.ignore_label) / len(
            self.aux_kinds)
    w = self.k["unsup_weight"] * C.sigmoid_rampup(step, self.k["rampup_fraction"] *
                                                  self.total_steps)
    if sure is not None:
      metrics["confident"] = jnp.mean(sure)
    metrics.update(unsup_loss=unsup, w_u=w,
                   **{f"unsup/{kind}": jnp.mean(jnp.stack(v)) for kind, v in per_kind.items()})
    total = sup + w * unsup
    if weak is not None:
      metrics["weak_loss"] = weak_loss
      total = total + self.k["weak_weight"] * weak_loss
    return total, (metrics, new_state)

  # --- evaluation ---------------------------------------------------------------------------
  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``'logits'``: the main decoder's eval-mode logits ``[B, S, S, num_classes]``."""
    def logits(params, state, batch):
      return self.model.apply({"params": params, "batch_stats": state["batch_stats"]},
                              self.normalize(batch["image"]), train=False)
    return {"logits": logits}

  def eval_transform(self, kind: str, **opts: Any) -> base.EvalTransform:
    return image_mask_transform(self, kind, opts)


def image_mask_transform(task: Any, kind: str, opts: dict) -> base.EvalTransform:
  """The ``'image_mask'`` eval rows of a segmentation task (``task.image_key``,
  ``mask_key``, ``image_size``): ``{'image': uint8 [S, S, C], 'mask': int32 [S, S]}``."""
  if kind != "image_mask" or opts:
    return base.Task.eval_transform(task, kind, **opts)
  t = transforms.build([{"op": "resize", "size": task.image_size, "keys": ["image", "mask"]}])
  image_key, mask_key = task.image_key, task.mask_key

  def row(ex):
    mask = np.asarray(ex[mask_key])
    out = t({"image": np.asarray(ex[image_key], np.uint8),
             "mask": mask[..., 0] if mask.ndim == 3 else mask})
    return {"image": out["image"], "mask": out["mask"].astype(np.int32)}
  return row
