"""Autoregressive unsupervised image segmentation (Ouali, Hudelot, Tami 2020, "Autoregressive
Unsupervised Image Segmentation", ECCV).

An autoregressive network ``f`` (``bigvl.models.masked_conv.AutoregressiveNet``: masked
convolutions, stride 1) run under ordering ``o`` sees, at each pixel, only the pixels before it
in that raster-scan ordering; two orderings ``o1 != o2`` of the same image are two *views* of
it (each pixel's output is computed from a different half of its neighbourhood), and training
maximises the mutual information between them. No label is ever read::

    AC  (clustering):      L = -I_lambda(P),  P = iic_joint(softmax(f_o1(x)), softmax(f_o2(x)),
                                                           max_shift)
    ARL (representation):  L = spatial InfoNCE(g_o1(x), g_o2(x), max_shift, temperature)

(``bigvl.losses.mutual_info``: IIC's joint over pixels and displacements within
``[-s, s]^2``, symmetrised, ``I_lambda = sum P_ij (log P_ij - lambda log P_i - lambda log
P_j)``; InfoNCE with the other ordering's features at the same location and its neighbours as
positives.) ``ar.objective``: ``'clustering'`` (AC), ``'representation'`` (ARL) or ``'both'``
(their sum, ``ar.representation_weight`` on ARL). The pair ``(o1, o2)`` is drawn uniformly per
step from the distinct pairs of ``ar.orderings`` (all 8 by default); ``ar.color_jitter > 0``
gives each view its own photometric jitter (:func:`photometric_jitter`, as IIC's views: the
clusters cannot rest on colour alone; ``ar.invert``: the probability that a view is also
inverted, so that not even the darker / lighter split is shared); with a single ordering
both views are the same network output (``o1 = o2``): the *no cross-ordering MI* ablation,
where only the displacement window relates the two sides.

Inference uses no mask ("in inference, no masking is applied and we fall back to the standard
convolution"): prediction function ``'clusters'`` (``[B, H, W, K]`` logits); also
``'clusters_ensemble'`` (the log of the mean over the training orderings of the masked
networks' softmax) and ``'features'`` (``[B, H, W, D]``, unmasked). Evaluation: the
``segmentation`` evaluator with ``hungarian=True`` (clusters matched to classes on the eval
set), eval kind ``'image_mask'``.

Task state: ``batch_stats`` (updated by the first view's pass; the second view's pass
normalises with its own batch statistics and discards them).

Config read: ``seed``, ``ar.*`` (:data:`DEFAULTS`), ``input.{dataset, data_dir, split,
image_size, batch_size, num_threads, flip, max_translate, mean, std, image_key, mask_key
(evaluation only), transforms}``, ``model.*`` (``masked_conv``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int, read_knobs
from bigvl.data import pipeline, sources, transforms
from bigvl.losses import mutual_info as MI
from bigvl.models.masked_conv import NUM_ORDERINGS
from bigvl.tasks import base
from bigvl.tasks.cct import image_mask_transform

OBJECTIVES = ("clustering", "representation", "both")
#: ``config.ar`` knobs (the paper's: IIC's lambda 1, a 3x3 displacement window).
DEFAULTS: dict[str, Any] = {
    "objective": "clustering", "num_clusters": 5, "orderings": tuple(range(NUM_ORDERINGS)),
    "max_shift": 1, "lamb": 1.0, "temperature": 0.1, "representation_weight": 1.0,
    "color_jitter": 0.0, "invert": 0.0,
}


def read_ar_knobs(r: Reader | None) -> dict[str, Any]:
  k = read_knobs(r, DEFAULTS, "config.ar")
  check_choice("config.ar.objective", k["objective"], OBJECTIVES)
  orderings = k["orderings"]
  if not orderings or len(set(orderings)) != len(orderings) or not all(
      isinstance(o, int) and 0 <= o < NUM_ORDERINGS for o in orderings):
    raise ConfigError(f"config.ar.orderings must be distinct ints in [0, {NUM_ORDERINGS}), "
                      f"got {orderings!r}")
  if not 0 <= k["invert"] <= 1:
    raise ConfigError(f"config.ar.invert must be in [0, 1], got {k['invert']}")
  if k["num_clusters"] < 2 or k["max_shift"] < 0:
    raise ConfigError("config.ar.num_clusters must be >= 2 and max_shift >= 0")
  if k["temperature"] <= 0 or min(k["lamb"], k["representation_weight"], k["color_jitter"]) < 0:
    raise ConfigError("config.ar.temperature must be > 0; lamb, representation_weight and "
                      "color_jitter >= 0")
  return k


def photometric_jitter(x: jax.Array, rng: jax.Array, strength: float,
                       invert: float = 0.0) -> jax.Array:
  """IIC's kind of photometric view (Ji et al. 2019 jitter colour so that clusters cannot
  rest on it): per image, the RGB values in ``[0, 1]`` ``x [B, H, W, 3]`` are rotated about
  the grey axis by a hue angle ``U(-pi, pi) strength``, their saturation scaled by
  ``U(1 - s, 1 + s)``, contrast by ``U(1 - s/2, 1 + s/2)`` and brightness shifted by
  ``U(-s/4, s/4)`` (``s = min(strength, 1)``), clipped to ``[0, 1]``, and inverted
  (``1 - x``) with probability ``invert`` (then the two views do not even agree on which
  regions are darker: only the patterns remain shared). Geometry is untouched, so the two
  views still correspond pixel by pixel."""
  b = x.shape[0]
  ka, ks, kc, kb, ki = jax.random.split(rng, 5)
  s = min(strength, 1.0)
  angle = jax.random.uniform(ka, (b,), minval=-jnp.pi, maxval=jnp.pi) * strength
  grey = jnp.mean(x, axis=-1, keepdims=True)
  # rotation about (1, 1, 1) / sqrt(3): Rodrigues' formula on the chroma part
  axis = jnp.ones(3) / jnp.sqrt(3.0)
  chroma = x - grey
  cos, sin = (f(angle)[:, None, None, None] for f in (jnp.cos, jnp.sin))
  chroma = chroma * cos + jnp.cross(axis, chroma) * sin
  u = jax.random.uniform(ks, (b, 1, 1, 1), minval=1 - s, maxval=1 + s)
  y = grey + chroma * u
  mean = jnp.mean(y, axis=(1, 2, 3), keepdims=True)
  c = jax.random.uniform(kc, (b, 1, 1, 1), minval=1 - s / 2, maxval=1 + s / 2)
  shift = jax.random.uniform(kb, (b, 1, 1, 1), minval=-s / 4, maxval=s / 4)
  y = jnp.clip((y - mean) * c + mean + shift, 0.0, 1.0)
  flip = jax.random.bernoulli(ki, invert, (b, 1, 1, 1))
  return jnp.where(flip, 1.0 - y, y)


def ordering_pairs(orderings: tuple[int, ...]) -> np.ndarray:
  """``[N, 2]`` the ordered pairs of distinct orderings (``[[o, o]]`` for a single one)."""
  if len(orderings) == 1:
    return np.array([[orderings[0]] * 2], np.int32)
  return np.array([(a, b) for a in orderings for b in orderings if a != b], np.int32)


class Task(base.Task):
  progress_keys = ("mi", "h_clusters", "infonce")
  eval_kinds = ("image_mask",)

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    self.k = read_ar_knobs(config.get("ar"))
    self.pairs = jnp.asarray(ordering_pairs(self.k["orderings"]))
    inp = config.input
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.image_key = inp.typed("image_key", str, "image")
    self.mask_key = inp.typed("mask_key", str, "mask")
    self.image_size = positive_int(inp, "image_size")
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.mean, self.std = base.read_mean_std(inp)
    self.source, _ = sources.get_source(self.dataset, inp.typed("split", str, "train"),
                                        self.data_dir)
    if self.k["max_shift"] >= self.image_size:
      raise ConfigError(f"config.ar.max_shift={self.k['max_shift']} must be < image_size")
    copy = [] if self.image_key == "image" else [{"op": "copy", "args": [{self.image_key:
                                                                           "image"}]}]
    default = [*copy, {"op": "resize", "size": self.image_size},
               {"op": "weak", "flip": inp.typed("flip", bool, True),
                "max_translate": float(inp.typed("max_translate", (float, int), 0.0))},
               {"op": "keep", "keys": ["image"]}]  # the labels are never read in training
    self.transform = transforms.build(inp.typed("transforms", (list, tuple), default),
                                      where=f"{inp.path}.transforms")
    m = config.model
    self.model = registry.load("models", m.typed("name", str), "model").from_config(
        m, num_clusters=self.k["num_clusters"])

  # --- host side ----------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.source)

  @property
  def examples_per_step(self) -> int:
    return 2 * self.batch_size  # two views (orderings) of each image go through the network

  def train_data(self, seed: int) -> pipeline.DataIterator:
    return pipeline.train_iterator(self.source, self.transform, batch_size=self.host_batch,
                                   seed=seed, num_threads=self.num_threads)

  # --- pure functions -----------------------------------------------------------------------
  def _standardize(self, x: jax.Array) -> jax.Array:
    return (x - self.mean) / self.std

  def normalize(self, images: jax.Array) -> jax.Array:
    return self._standardize(images.astype(jnp.float32) / 255.0)

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    variables = self.model.init(rng, self.normalize(batch["image"]), 0, train=False)
    return variables["params"], {"batch_stats": variables["batch_stats"]}

  def loss(self, params, state, batch, rng, step):
    k = self.k
    r_pair, r1, r2 = jax.random.split(rng, 3)
    x1 = x2 = batch["image"].astype(jnp.float32) / 255.0
    if k["color_jitter"] > 0:
      x1 = photometric_jitter(x1, r1, k["color_jitter"], k["invert"])
      x2 = photometric_jitter(x2, r2, k["color_jitter"], k["invert"])
    o1, o2 = self.pairs[jax.random.randint(r_pair, (), 0, self.pairs.shape[0])]
    variables = {"params": params, "batch_stats": state["batch_stats"]}
    out1, upd = self.model.apply(variables, self._standardize(x1), o1, train=True,
                                 mutable=["batch_stats"])
    out2, _ = self.model.apply(variables, self._standardize(x2), o2, train=True,
                               mutable=["batch_stats"])
    metrics, total = {"o1": o1, "o2": o2}, 0.0
    if k["objective"] in ("clustering", "both"):
      p1, p2 = (jax.nn.softmax(o["clusters"], axis=-1) for o in (out1, out2))
      mi = MI.iic_mutual_information(p1, p2, k["max_shift"], k["lamb"])
      marginal = jnp.mean(p1, axis=(0, 1, 2))
      metrics.update(mi=mi, h_clusters=-jnp.sum(marginal * jnp.log(marginal + 1e-12)))
      total = total - mi
    if k["objective"] in ("representation", "both"):
      nce = MI.spatial_infonce(out1["features"], out2["features"], k["max_shift"],
                               k["temperature"])
      metrics["infonce"] = nce
      total = total + k["representation_weight"] * nce
    return total, (metrics, {**state, "batch_stats": upd["batch_stats"]})

  # --- evaluation ---------------------------------------------------------------------------
  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``'clusters'`` (no mask), ``'clusters_ensemble'`` (masked, averaged over the
    orderings), ``'features'`` (no mask); module docstring."""
    def run(params, state, batch, ordering):
      return self.model.apply({"params": params, "batch_stats": state["batch_stats"]},
                              self.normalize(batch["image"]), ordering, train=False)

    def ensemble(params, state, batch):
      probs = [jax.nn.softmax(run(params, state, batch, o)["clusters"], axis=-1)
               for o in self.k["orderings"]]
      return jnp.log(jnp.mean(jnp.stack(probs), axis=0) + 1e-12)

    return {"clusters": lambda p, s, b: run(p, s, b, None)["clusters"],
            "clusters_ensemble": ensemble,
            "features": lambda p, s, b: run(p, s, b, None)["features"]}

  def eval_transform(self, kind: str, **opts: Any) -> base.EvalTransform:
    return image_mask_transform(self, kind, opts)
