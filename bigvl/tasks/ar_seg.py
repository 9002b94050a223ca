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
step from the distinct pairs of ``ar.orderings`` (all 8 by default); with a single ordering
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
}


def read_ar_knobs(r: Reader | None) -> dict[str, Any]:
  k = read_knobs(r, DEFAULTS, "config.ar")
  check_choice("config.ar.objective", k["objective"], OBJECTIVES)
  orderings = k["orderings"]
  if not orderings or len(set(orderings)) != len(orderings) or not all(
      isinstance(o, int) and 0 <= o < NUM_ORDERINGS for o in orderings):
    raise ConfigError(f"config.ar.orderings must be distinct ints in [0, {NUM_ORDERINGS}), "
                      f"got {orderings!r}")
  if k["num_clusters"] < 2 or k["max_shift"] < 0:
    raise ConfigError("config.ar.num_clusters must be >= 2 and max_shift >= 0")
  if k["temperature"] <= 0 or k["lamb"] < 0 or k["representation_weight"] < 0:
    raise ConfigError("config.ar.temperature must be > 0, lamb and representation_weight >= 0")
  return k


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
    self.mean = np.asarray(inp.get("mean", (0.5,)), np.float32).reshape(-1)
    self.std = np.asarray(inp.get("std", (0.5,)), np.float32).reshape(-1)
    if np.any(self.std <= 0):
      raise ConfigError(f"config.input.std must be > 0, got {self.std.tolist()}")
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
  def normalize(self, images: jax.Array) -> jax.Array:
    return (images.astype(jnp.float32) / 255.0 - self.mean) / self.std

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    variables = self.model.init(rng, self.normalize(batch["image"]), 0, train=False)
    return variables["params"], {"batch_stats": variables["batch_stats"]}

  def loss(self, params, state, batch, rng, step):
    k = self.k
    x = self.normalize(batch["image"])
    o1, o2 = self.pairs[jax.random.randint(rng, (), 0, self.pairs.shape[0])]
    variables = {"params": params, "batch_stats": state["batch_stats"]}
    out1, upd = self.model.apply(variables, x, o1, train=True, mutable=["batch_stats"])
    out2, _ = self.model.apply(variables, x, o2, train=True, mutable=["batch_stats"])
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
