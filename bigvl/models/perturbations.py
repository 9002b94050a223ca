"""Perturbations of an encoder's output for Cross-Consistency Training (Ouali, Hudelot, Tami
2020, "Semi-Supervised Semantic Segmentation with Cross-Consistency Training", Sec. 3.2).

Pure ``jax.numpy`` functions of features ``z [B, h, w, D]`` (and, for the prediction-based
ones, the main decoder's predicted labels ``pred [B, h, w]`` at the features' resolution,
0 = background); each auxiliary decoder of CCT sees one of them. Defaults are the official
code's (``configs/config.json``).

===============  ==========================================================================
feature_noise    ``z + z * N``, ``N ~ U(-r, r)`` of shape ``[h, w, D]`` shared by the batch
                 (F-Noise; ``r = 0.3``)
feature_dropout  zeroes the most activated region: ``a = mean_D z``, ``gamma ~ U(0.7, 0.9)``
                 per example, keep ``a < gamma max(a)`` (F-Drop)
spatial_dropout  drops whole channels, ``z * m / (1 - p)``, ``m ~ Bernoulli(1 - p)`` of shape
                 ``[B, 1, 1, D]`` (DropOut, PyTorch's ``Dropout2d``; ``p = 0.5``)
vat              ``z + r_adv``, VAT's adversarial direction for the main decoder computed on
                 the features (I-VAT; ``xi = 1e-6``, ``eps = 2.0``): see
                 ``bigvl.losses.consistency.vat_perturbation``
guided_cutout    per predicted object class, a box of ``erase`` (0.4) times its bounding
                 box's sides, placed at random inside it, is zeroed (G-Cutout)
context_masking  ``z * 1[pred > 0]``: only the predicted objects remain (Con-Msk)
object_masking   ``z * 1[pred == 0]``: only the predicted background remains (Obj-Msk)
===============  ==========================================================================

G-Cutout: the official code finds each predicted foreground's connected components
(OpenCV contours of more than 50 points) and cuts a box out of each; inside a jitted step we
take the bounding box of each predicted class instead (one object per class in our synthetic
scenes; several same-class objects share one box).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: the perturbation names (the keys of ``config.cct.aux``), in CCT's decoder order.
KINDS = ("vat", "dropout", "cutout", "context_mask", "object_mask", "feature_drop",
         "feature_noise")
#: the perturbations that read the main decoder's prediction.
GUIDED = ("cutout", "context_mask", "object_mask")


def feature_noise(z: Array, rng: Array, uniform: float = 0.3) -> Array:
  """F-Noise: ``z + z * N``, ``N ~ U(-uniform, uniform)`` of shape ``z.shape[1:]`` (one noise
  tensor for the whole batch, as the official ``FeatureNoiseDecoder``)."""
  noise = jax.random.uniform(rng, z.shape[1:], jnp.float32, -uniform, uniform)
  return z + z * noise.astype(z.dtype)[None]


def feature_dropout(z: Array, rng: Array, low: float = 0.7, high: float = 0.9) -> Array:
  """F-Drop: keeps the positions whose channel-mean activation is below ``gamma`` times the
  example's maximum, ``gamma ~ U(low, high)`` per example (drops the most salient region)."""
  attention = jnp.mean(z, axis=-1, keepdims=True)  # [B, h, w, 1]
  peak = jnp.max(attention, axis=(1, 2, 3), keepdims=True)
  gamma = jax.random.uniform(rng, (z.shape[0], 1, 1, 1), jnp.float32, low, high)
  keep = (attention < peak * gamma.astype(z.dtype)).astype(z.dtype)
  return z * keep


def spatial_dropout(z: Array, rng: Array, rate: float = 0.5) -> Array:
  """DropOut: channel dropout, ``z * m / (1 - rate)`` with ``m ~ Bernoulli(1 - rate)`` of
  shape ``[B, 1, 1, D]`` (a dropped channel is zero at every position)."""
  if rate <= 0:
    return z
  keep = jax.random.bernoulli(rng, 1.0 - rate, (z.shape[0], 1, 1, z.shape[-1]))
  return z * keep.astype(z.dtype) / (1.0 - rate)


def context_masking(z: Array, pred: Array) -> Array:
  """Con-Msk: ``z`` where the prediction is an object (``pred > 0``), zero elsewhere."""
  return z * (pred > 0).astype(z.dtype)[..., None]


def object_masking(z: Array, pred: Array) -> Array:
  """Obj-Msk: ``z`` where the prediction is background (``pred == 0``), zero elsewhere."""
  return z * (pred == 0).astype(z.dtype)[..., None]


def cutout_mask(pred: Array, rng: Array, num_classes: int, erase: float = 0.4) -> Array:
  """``[B, h, w]`` 0/1 mask of G-Cutout: for every class ``c >= 1`` predicted in an example,
  with bounding box rows ``y0..y1`` and columns ``x0..x1`` (``bh = y1 - y0``, ``bw = x1 - x0``
  as the official code measures them), the box rows ``[y0 + u, y0 + u + floor(erase bh))``
  and columns ``[x0 + v, x0 + v + floor(erase bw))`` are zero, ``u`` uniform in
  ``0..floor((1 - erase) bh)`` and ``v`` likewise."""
  b, h, w = pred.shape
  classes = jnp.arange(1, num_classes)
  hit = pred[:, None] == classes[None, :, None, None]  # [B, K-1, h, w]
  present = jnp.any(hit, axis=(2, 3))
  rows, cols = jnp.any(hit, axis=3), jnp.any(hit, axis=2)  # [B, K-1, h], [B, K-1, w]

  def extent(line, n):
    idx = jnp.arange(n)
    return (jnp.min(jnp.where(line, idx, n), axis=-1),
            jnp.max(jnp.where(line, idx, -1), axis=-1))

  y0, y1 = extent(rows, h)
  x0, x1 = extent(cols, w)
  bh, bw = (y1 - y0).astype(jnp.float32), (x1 - x0).astype(jnp.float32)
  u_y, u_x = jax.random.uniform(rng, (2, b, num_classes - 1))
  start_y = y0 + jnp.floor(u_y * (jnp.floor(bh * (1 - erase)) + 1)).astype(jnp.int32)
  start_x = x0 + jnp.floor(u_x * (jnp.floor(bw * (1 - erase)) + 1)).astype(jnp.int32)
  end_y = start_y + jnp.floor(bh * erase).astype(jnp.int32)
  end_x = start_x + jnp.floor(bw * erase).astype(jnp.int32)
  iy, ix = jnp.arange(h)[None, None, :, None], jnp.arange(w)[None, None, None, :]
  inside = ((iy >= start_y[..., None, None]) & (iy < end_y[..., None, None])
            & (ix >= start_x[..., None, None]) & (ix < end_x[..., None, None])
            & present[..., None, None])
  return 1.0 - jnp.any(inside, axis=1).astype(jnp.float32)


def guided_cutout(z: Array, pred: Array, rng: Array, num_classes: int,
                  erase: float = 0.4) -> Array:
  """G-Cutout: ``z * cutout_mask(pred)`` (:func:`cutout_mask`)."""
  return z * cutout_mask(pred, rng, num_classes, erase).astype(z.dtype)[..., None]


def labels_at(logits: Array, size: tuple[int, int]) -> Array:
  """The predicted labels ``argmax`` of ``logits [B, H, W, K]`` at the pixel under the centre
  of each cell of an ``size = (h, w)`` grid (nearest-neighbour downsampling, as the official
  code's ``F.interpolate(mode='nearest')`` of its masks)."""
  _, big_h, big_w, _ = logits.shape
  h, w = size
  rows = jnp.minimum(((jnp.arange(h) + 0.5) * (big_h / h)).astype(jnp.int32), big_h - 1)
  cols = jnp.minimum(((jnp.arange(w) + 0.5) * (big_w / w)).astype(jnp.int32), big_w - 1)
  return jnp.argmax(logits[:, rows][:, :, cols], axis=-1)
