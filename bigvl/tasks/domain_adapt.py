"""Unsupervised domain adaptation: a labeled source domain, an unlabeled target domain, one
classifier that must work on the target. ``config.method`` picks the invariance term; Target
Consistency (TC) and Class-Level InVariance (CLIV) add to any of them.

Every step sees ``B`` labeled source images ``(x_s, y_s)`` and ``B`` unlabeled target images
``x_t`` (their labels are never read: the target stream keeps only the image), forwarded
together (batch norm over both domains), ``f`` the pooled features and ``h`` the logits::

    L = CE(h(x_s), y_s) + a * L_adv + w_tc(t) * L_tc + w_cliv(t) * L_cliv

==============  =============================================================================
method          ``L_adv`` (``bigvl.losses.domain``; the discriminator ``D`` sees its input
                through a gradient reversal layer with ``lambda_p = 2 / (1 + exp(-10 p)) - 1``,
                ``p`` the training progress: ``D`` minimises the loss, the features maximise
                it)
==============  =============================================================================
source_only     none: the baseline (trained on the source alone, same steps; without TC or
                CLIV no target image is forwarded, not even for batch-norm statistics)
dann            ``BCE(D(f_s), 1) + BCE(D(f_t), 0)`` (Ganin et al. 2016)
cdan            ``D`` sees ``f (x) g``, ``g = softmax(h)`` (gradient-stopped): the multilinear
                map (``da.randomized``: its randomized version) (Long et al. 2018)
cdan_e          CDAN with each example weighted by ``1 + exp(-H(g))`` (confident examples
                count more; weights normalised per domain)
==============  =============================================================================

**Target Consistency** (Ouali, Bouvier, Tami, Hudelot 2020, "Target Consistency for Domain
Adaptation: when Robustness meets Transferability"): invariance with a low source risk does
not make a good target classifier when the cluster assumption fails on the target; TC enforces
it: the target prediction must not change under a perturbation of the target input,
``L_tc = D(sg(p(x_t)), p(x_t + r))`` (``da.tc_kind``: KL, MSE or CE to the argmax;
``da.tc_threshold`` masks unconfident targets). The perturbation (``da.tc_perturbation``):
``'vat'``, the adversarial direction of VAT (``bigvl.losses.consistency.vat_perturbation``,
norm ``da.vat_eps`` in normalised input units), or ``'augment'``, a strong augmentation of the
target image (``bigvl.data.augment``, made on the host).
**Class-Level InVariance**: source and target aligned per class, the target's classes from its
confident pseudo-labels (``da.cliv_threshold``). ``da.cliv_kind``: ``'centroid'`` (squared
distance between per-class feature centroids, ``bigvl.losses.domain.class_centroid_alignment``)
or ``'adversarial'`` (a second discriminator on ``f (x) onehot(y)``: source labels, target
pseudo-labels, unconfident targets weighted ~0). The paper's exact perturbation and CLIV formula
could not be read offline; these are the readings closest to its abstract, both behind knobs
(``docs/domain_adaptation.md``). ``w_tc``, ``w_cliv`` ramp up with
``consistency.sigmoid_rampup`` over the first ``da.rampup_fraction`` of training.

Task state: ``batch_stats`` (BN running statistics). Evaluation: eval kind ``'image_label'``
(images resized to ``input.image_size``, so the source's and the target's test splits both
evaluate); prediction function ``'logits'``.

Config read: ``method``, ``da.*``, ``input.{source, target}.{dataset, split, image_key,
label_key}``, ``input.{data_dir, image_size, channels, batch_size (per domain), num_threads, flip,
max_translate, strong_num_ops, strong_ops, mean, std}``, ``model.*`` (``small_cnn`` |
``wide_resnet``), ``total_steps`` (the schedules' length).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.config import read_knobs as read_knobs_over
from bigvl.data import augment, pipeline, sources, streams, transforms
from bigvl.losses import consistency as C
from bigvl.losses import domain as D
from bigvl.models import logical
from bigvl.tasks import base

METHODS = ("source_only", "dann", "cdan", "cdan_e")
TC_PERTURBATIONS = ("vat", "augment")
CLIV_KINDS = ("centroid", "adversarial")
#: ``config.da`` knobs and defaults (DANN / CDAN papers' where they give one).
DEFAULTS: dict[str, Any] = {
    "adv_weight": 1.0, "grl_alpha": 10.0, "grl_max": 1.0, "disc_hidden": 256,
    "disc_dropout": 0.5, "randomized": False, "random_dim": 1024,
    "tc_weight": 0.0, "tc_perturbation": "vat", "tc_kind": "kl", "tc_threshold": 0.0,
    "vat_xi": 1e-6, "vat_eps": 1.0,
    "cliv_weight": 0.0, "cliv_kind": "centroid", "cliv_threshold": 0.9,
    "rampup_fraction": 0.3,
}


class Discriminator(nn.Module):
  """The domain discriminator: ``[B, d] -> [B]`` logits (source = 1), two hidden ReLU layers
  with dropout, as DANN's / CDAN's ``AdversarialNetwork``."""

  hidden: int = 256
  dropout: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(2):
      x = logical.dense(self.hidden, ("embed", "mlp") if i == 0 else ("mlp", "mlp"),
                        name=f"fc{i}")(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.relu(x))
    return logical.dense(1, ("mlp", None), name="out")(x)[:, 0].astype(jnp.float32)


def read_knobs(r: Reader | None) -> dict[str, Any]:
  """``config.da`` over :data:`DEFAULTS`, type- and range-checked (one ConfigError line)."""
  out = read_knobs_over(r, DEFAULTS, "config.da")
  for name in ("adv_weight", "tc_weight", "cliv_weight", "grl_alpha", "grl_max", "vat_eps",
               "vat_xi"):
    if out[name] < 0:
      raise ConfigError(f"config.da.{name} must be >= 0, got {out[name]}")
  for name in ("tc_threshold", "cliv_threshold", "rampup_fraction", "disc_dropout"):
    if not 0 <= out[name] <= 1:
      raise ConfigError(f"config.da.{name} must be in [0, 1], got {out[name]}")
  check_choice("config.da.tc_perturbation", out["tc_perturbation"], TC_PERTURBATIONS)
  check_choice("config.da.tc_kind", out["tc_kind"], D.KINDS_TC)
  check_choice("config.da.cliv_kind", out["cliv_kind"], CLIV_KINDS)
  return out


class Task(base.Task):
  progress_keys = ("cls_loss", "adv_loss", "tc_loss", "cliv_loss", "src_acc", "lam")
  eval_kinds = ("image_label",)

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    self.method = check_choice("config.method", config.typed("method", str), METHODS)
    self.k = read_knobs(config.get("da"))
    total = config.get("total_steps")
    if not isinstance(total, int) or total <= 0:
      raise ConfigError("task domain_adapt needs config.total_steps (its GRL and ramp-up "
                        "schedules follow the training progress)")
    self.total_steps = total
    inp = config.input
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    src, tgt = inp.source, inp.target
    self.source_name = src.typed("dataset", str)
    self.dataset = tgt.typed("dataset", str)  # evaluators default to the target domain
    self.image_key = {"source": src.typed("image_key", str, "image"),
                      "target": tgt.typed("image_key", str, "image")}
    self.label_key = src.typed("label_key", str, "label")
    self.eval_label_key = tgt.typed("label_key", str, "label")  # eval only, never trained on
    self.src_source, src_info = sources.get_source(
        self.source_name, src.typed("split", str, "train"), self.data_dir)
    self.tgt_source, _ = sources.get_source(self.dataset, tgt.typed("split", str, "train"),
                                            self.data_dir)
    labels = streams.read_labels(self.src_source, self.label_key)
    if src_info is not None and self.label_key in src_info.features and hasattr(
        src_info.features[self.label_key], "num_classes"):
      self.num_classes = int(src_info.features[self.label_key].num_classes)
    else:
      self.num_classes = int(labels.max()) + 1
    self.image_size = positive_int(inp, "image_size")
    channels = inp.typed("channels", int, None)  # None: as stored (both domains must agree)
    self._channels = [] if channels is None else [{"op": "channels", "num": channels}]
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.flip = inp.typed("flip", bool, False)
    self.max_translate = float(inp.typed("max_translate", (float, int), 0.125))
    self.strong = {"op": "strong", "flip": self.flip, "max_translate": self.max_translate,
                   "num_ops": positive_int(inp, "strong_num_ops", 2),
                   "ops": list(inp.get("strong_ops", tuple(augment.OPS)))}
    self.mean, self.std = base.read_mean_std(inp)
    self.source_transform, self.target_transform = (
        transforms.build(s, where=f"{inp.path}.{n}") for s, n in
        zip(self._pipelines(), ("source", "target"), strict=True))
    m = config.model
    self.model = registry.load("models", m.typed("name", str), "model").from_config(
        m, num_classes=self.num_classes)
    self.disc = Discriminator(self.k["disc_hidden"], self.k["disc_dropout"])

  @property
  def tc(self) -> bool:
    return self.k["tc_weight"] > 0

  @property
  def cliv(self) -> bool:
    return self.k["cliv_weight"] > 0

  @property
  def source_only(self) -> bool:
    """Nothing reads the target: the baseline."""
    return self.method == "source_only" and not self.tc and not self.cliv

  @property
  def adversarial(self) -> bool:
    return self.method != "source_only"

  def _pipelines(self) -> tuple[list, list]:
    """Source: resize, weak augmentation, label; target: resize, the weak view (and a strong
    view for ``tc_perturbation='augment'``) stacked ``[V, H, W, C]``, no label."""
    def image(domain):
      key = self.image_key[domain]
      return ([] if key == "image" else [{"op": "copy", "args": [{key: "image"}]}]) + [
          {"op": "resize", "size": self.image_size}] + self._channels
    weak = {"op": "weak", "flip": self.flip, "max_translate": self.max_translate}
    views = [[weak]] + ([[self.strong]] if self.tc and self.k["tc_perturbation"] == "augment"
                        else [])
    source = [*image("source"), weak, {"op": "cast", "key": self.label_key, "out": "label"},
              {"op": "keep", "keys": ["image", "label"]}]
    target = [*image("target"), {"op": "views", "args": views, "out": "image"},
              {"op": "keep", "keys": ["image"]}]
    return source, target

  # --- host side ----------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.src_source)

  @property
  def examples_per_step(self) -> int:
    views = 2 if self.tc and self.k["tc_perturbation"] == "augment" else 1
    return self.batch_size * (1 if self.source_only else 1 + views)

  def train_data(self, seed: int) -> streams.ZipIterator:
    seeds = np.random.SeedSequence(seed).generate_state(2)
    return streams.ZipIterator({
        "source": pipeline.batched(pipeline.train_stream(
            self.src_source, self.source_transform, int(seeds[0] % (2**31 - 1))),
            self.host_batch, self.num_threads),
        "target": pipeline.batched(pipeline.train_stream(
            self.tgt_source, self.target_transform, int(seeds[1] % (2**31 - 1))),
            self.host_batch, self.num_threads)}, (self.src_source, self.tgt_source))

  # --- pure functions -----------------------------------------------------------------------
  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 images (``[..., H, W, C]``) -> ``(x / 255 - mean) / std`` float32."""
    return (images.astype(jnp.float32) / 255.0 - self.mean) / self.std

  def _disc_dim(self, feature_dim: int) -> int:
    if self.method == "dann":
      return feature_dim
    return self.k["random_dim"] if self.k["randomized"] else feature_dim * self.num_classes

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    x = self.normalize(batch["source"]["image"])
    r_net, r_disc, r_cliv, r_proj = jax.random.split(rng, 4)
    variables = self.model.init({"params": r_net, "dropout": r_net}, x, train=False)
    feat_dim = self.model.apply(variables, x, train=False, return_features=True)[1].shape[-1]
    params = {"net": variables["params"]}
    state: dict[str, Any] = {"batch_stats": variables["batch_stats"]}
    if self.adversarial:
      params["disc"] = self.disc.init(r_disc, jnp.zeros((1, self._disc_dim(feat_dim))),
                                      train=False)["params"]
      if self.k["randomized"] and self.method != "dann":
        state["projections"] = D.random_projections(r_proj, feat_dim, self.num_classes,
                                                    self.k["random_dim"])
    if self.cliv and self.k["cliv_kind"] == "adversarial":
      params["cliv_disc"] = self.disc.init(
          r_cliv, jnp.zeros((1, feat_dim * self.num_classes)), train=False)["params"]
    return params, state

  def _net(self, params, batch_stats, x, rng, update_stats=True):
    """Train-mode forward: ``(logits, features, batch_stats)``."""
    (logits, feats), upd = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, return_features=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    return logits, feats, (upd["batch_stats"] if update_stats else batch_stats)

  def _adversarial(self, params, state, logits, feats, lam, b, rng):
    """``L_adv`` of the method and the discriminator's accuracy."""
    if self.method == "dann":
      d_in = feats
    else:
      g = jax.lax.stop_gradient(jax.nn.softmax(logits, axis=-1))
      d_in = (D.randomized_multilinear_map(feats, g, *state["projections"])
              if self.k["randomized"] else D.multilinear_map(feats, g))
    d = self.disc.apply({"params": params["disc"]}, D.grad_reverse(d_in, lam), train=True,
                        rngs={"dropout": rng})
    weights = {}
    if self.method == "cdan_e":
      w = D.entropy_weights(logits)
      weights = {"w_src": w[:b], "w_tgt": w[b:]}
    loss = D.domain_bce(d[:b], d[b:], **weights)
    acc = jnp.mean(jnp.concatenate([d[:b] > 0, d[b:] <= 0]).astype(jnp.float32))
    return loss, acc

  def _cliv(self, params, feats, logits, y_s, lam, b, rng):
    """``L_cliv`` and its metrics (module docstring)."""
    thr = self.k["cliv_threshold"]
    if self.k["cliv_kind"] == "centroid":
      loss, m = D.class_centroid_alignment(feats[:b], y_s, feats[b:], logits[b:],
                                           self.num_classes, thr)
      return loss, m
    y_t, mask = D.pseudo_labels(logits[b:], thr)
    onehot = jax.nn.one_hot(jnp.concatenate([y_s, y_t]), self.num_classes)
    d_in = D.multilinear_map(feats, onehot)
    d = self.disc.apply({"params": params["cliv_disc"]}, D.grad_reverse(d_in, lam), train=True,
                        rngs={"dropout": rng})
    loss = D.domain_bce(d[:b], d[b:], w_src=jnp.ones((b,)), w_tgt=mask + 1e-6)
    return loss, {"cliv_mask": jnp.mean(mask)}

  def loss(self, params, state, batch, rng, step):
    k, b = self.k, batch["source"]["image"].shape[0]
    r_net, r_adv, r_vat, r_cliv = jax.random.split(rng, 4)
    x_s = self.normalize(batch["source"]["image"])
    x_t = self.normalize(batch["target"]["image"])  # [B, V, H, W, C]
    y_s = batch["source"]["label"]
    # the source-only baseline never sees a target image (not even through batch norm)
    x = x_s if self.source_only else jnp.concatenate([x_s, x_t[:, 0]])
    logits, feats, batch_stats = self._net(params["net"], state["batch_stats"], x, r_net)
    cls = jnp.mean(C.cross_entropy(logits[:b], y_s))
    lam = D.grl_coefficient(step, self.total_steps, k["grl_alpha"], k["grl_max"])
    ramp = C.sigmoid_rampup(step, k["rampup_fraction"] * self.total_steps)
    metrics = {"cls_loss": cls, "lam": lam, "src_acc": jnp.mean(
        (jnp.argmax(logits[:b], -1) == y_s).astype(jnp.float32))}
    total = cls
    if self.adversarial:
      adv, disc_acc = self._adversarial(params, state, logits, feats, lam, b, r_adv)
      metrics.update(adv_loss=adv, disc_acc=disc_acc)
      total = total + k["adv_weight"] * adv
    if self.tc:
      # the perturbed targets go through the network beside the same source batch, so batch
      # norm normalises them exactly as the clean targets were (statistics not updated)
      def net(x_target):
        return self._net(params["net"], state["batch_stats"],
                         jnp.concatenate([x_s, x_target]), r_net, False)[0][b:]
      if k["tc_perturbation"] == "augment":
        perturbed = net(x_t[:, 1])
      else:
        r = C.vat_perturbation(net, x_t[:, 0], r_vat, xi=k["vat_xi"], eps=k["vat_eps"],
                               logits=logits[b:])
        perturbed = net(x_t[:, 0] + r)
      tc, tc_mask = D.target_consistency(logits[b:], perturbed, k["tc_kind"], k["tc_threshold"])
      metrics.update(tc_loss=tc, tc_mask=tc_mask)
      total = total + k["tc_weight"] * ramp * tc
    if self.cliv:
      cliv, m = self._cliv(params, feats, logits, y_s, lam, b, r_cliv)
      metrics.update(cliv_loss=cliv, **m)
      total = total + k["cliv_weight"] * ramp * cliv
    return total, (metrics, {**state, "batch_stats": batch_stats})

  # --- evaluation ---------------------------------------------------------------------------
  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``'logits'``: eval-mode logits ``[N, K]`` of ``batch['image']`` (uint8)."""
    def logits(params, state, batch):
      return self.model.apply({"params": params["net"], "batch_stats": state["batch_stats"]},
                              self.normalize(batch["image"]), train=False)
    return {"logits": logits}

  def eval_transform(self, kind: str, **opts: Any) -> base.EvalTransform:
    """``'image_label'``: ``{'image': uint8 [S, S, C] (resized), 'label': int32}`` of either
    domain's examples (``image`` / ``label`` keys of the target's config)."""
    if kind not in self.eval_kinds or opts:
      return super().eval_transform(kind, **opts)
    t = transforms.build([{"op": "resize", "size": self.image_size}, *self._channels,
                          {"op": "cast", "key": self.eval_label_key, "out": "label"}])
    rng = np.random.default_rng(0)
    image_key = self.image_key["target"]

    def row(ex):
      out = t({"image": np.asarray(ex[image_key], np.uint8),
               self.eval_label_key: ex[self.eval_label_key]}, rng)
      return {"image": out["image"], "label": out["label"]}
    return row
