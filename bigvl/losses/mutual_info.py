"""Mutual-information objectives between two per-pixel outputs of the same image.

Autoregressive Unsupervised Image Segmentation (Ouali, Hudelot & Tami 2020, ECCV) runs the
autoregressive network (``bigvl.models.masked_conv``) on an image under two orderings and
maximises the mutual information between the two outputs, at each pixel and its neighbours
within a small displacement window:

* Autoregressive Clustering (AC): the outputs are per-pixel cluster distributions and the MI is
  IIC's (Ji, Henriques & Vedaldi 2019, "Invariant Information Clustering for Unsupervised Image
  Classification and Segmentation"): :func:`iic_joint`, :func:`iic_mutual_information`,
  :func:`iic_loss`.
* Autoregressive Representation Learning (ARL): the outputs are per-pixel feature vectors and
  the MI is bounded below by InfoNCE (van den Oord et al. 2018, "Representation Learning with
  Contrastive Predictive Coding"): :func:`spatial_infonce`.

Pure ``jax.numpy``; everything is computed in float32; shapes ``[B, H, W, K]`` (NHWC, like the
model's outputs). Natural logarithms throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

#: IIC's clip for the joint and its marginals (``sys.float_info.epsilon`` in the IIC code).
EPS = 2.220446049250313e-16


def _check_window(shape: tuple[int, ...], max_shift: int) -> None:
  if max_shift < 0 or max_shift >= shape[1] or max_shift >= shape[2]:
    raise ValueError(f"max_shift={max_shift} must be in [0, min(H, W)) for maps {shape}")


def _displacements(max_shift: int) -> list[tuple[int, int]]:
  r = range(-max_shift, max_shift + 1)
  return [(dy, dx) for dy in r for dx in r]


def _overlap(a: Array, b: Array, dy: int, dx: int) -> tuple[Array, Array]:
  """``(a[:, u], b[:, u + t])`` over the pixels ``u`` with both ``u`` and ``u + t`` inside,
  ``t = (dy, dx)``: two [B, H - |dy|, W - |dx|, C] slices."""
  h, w = a.shape[1:3]
  a_part = a[:, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
  b_part = b[:, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
  return a_part, b_part


def iic_joint(p1: Array, p2: Array, max_shift: int = 0) -> Array:
  """IIC's joint distribution of the two outputs' clusters over pixels and displacements.

  ``P_t = 1/n_t sum_b sum_u p1(b, u) p2(b, u + t)^T`` over the ``n_t`` pixels ``u`` for which
  ``u + t`` is inside the image (the overlapping region), ``P' = 1/|T| sum_t P_t`` over the
  displacements ``T = [-s, s]^2`` (``s = max_shift``; ``s = 0``: same pixel only), then
  symmetrised and normalised: ``P = (P' + P'^T) / 2 / sum(P')``.

  Each displacement weighs the same. IIC's code instead zero-pads ``p2`` and sums all pairs of
  all displacements before normalising, which weighs displacement ``t`` by its overlap
  ``n_t`` (slightly less for the larger shifts); on the overlap both count the same pairs.

  Args:
    p1, p2: [B, H, W, K] per-pixel probabilities (rows summing to one).
    max_shift: s >= 0, smaller than H and W.
  Returns:
    [K, K] float32, symmetric, summing to one.
  """
  if p1.shape != p2.shape or p1.ndim != 4:
    raise ValueError(f"p1 {p1.shape} and p2 {p2.shape} must be the same [B, H, W, K]")
  _check_window(p1.shape, max_shift)
  p1, p2 = p1.astype(jnp.float32), p2.astype(jnp.float32)
  shifts = _displacements(max_shift)
  joint = 0.0
  for dy, dx in shifts:
    a, b = _overlap(p1, p2, dy, dx)
    joint = joint + jnp.einsum("bhwi,bhwj->ij", a, b) / (a.shape[0] * a.shape[1] * a.shape[2])
  joint = joint / len(shifts)
  joint = (joint + joint.T) / 2.0
  return joint / jnp.sum(joint)


def iic_mutual_information(p1: Array, p2: Array, max_shift: int = 0, lamb: float = 1.0,
                           eps: float = EPS) -> Array:
  """IIC's mutual information ``I(z1, z2) = sum_ij P_ij (log P_ij - lamb log P_i - lamb log
  P_j)``, ``P = iic_joint(p1, p2, max_shift)``, ``P_i = sum_j P_ij``, ``P_j = sum_i P_ij``.

  ``lamb = 1`` is the mutual information (Ji et al. 2019); ``lamb > 1`` is the IIC
  code's generalisation that rewards balanced (high-entropy) marginals more. As in IIC's code,
  the marginals are taken before clipping, then ``P``, ``P_i`` and ``P_j`` are clipped to
  ``>= eps``: finite values and gradients at one-hot outputs (entries below ``eps`` get no
  gradient).

  Identical one-hot outputs with K balanced clusters give ``log K``, the maximum. Because ``P``
  is symmetrised, independent outputs give 0 only when their cluster marginals agree (IIC
  assumes exchangeable views, as two orderings of one image are); ``p1 = e_1``, ``p2 = e_2``
  everywhere gives ``log 2``.

  Args:
    p1, p2: [B, H, W, K] per-pixel probabilities.
    max_shift, lamb, eps: as above.
  Returns:
    scalar float32 (nats).
  """
  joint = iic_joint(p1, p2, max_shift)
  p_i = jnp.sum(joint, axis=1, keepdims=True)
  p_j = jnp.sum(joint, axis=0, keepdims=True)
  joint, p_i, p_j = (jnp.maximum(v, eps) for v in (joint, p_i, p_j))
  return jnp.sum(joint * (jnp.log(joint) - lamb * jnp.log(p_i) - lamb * jnp.log(p_j)))


def iic_loss(p1: Array, p2: Array, max_shift: int = 0, lamb: float = 1.0,
             eps: float = EPS) -> Array:
  """``-iic_mutual_information(p1, p2, max_shift, lamb, eps)``: the Autoregressive Clustering
  loss (Ouali et al. 2020), minimised."""
  return -iic_mutual_information(p1, p2, max_shift, lamb, eps)


def spatial_infonce(z1: Array, z2: Array, max_shift: int = 1, temperature: float = 0.1) -> Array:
  """InfoNCE between two per-pixel representations over a displacement window: the
  Autoregressive Representation Learning loss (Ouali et al. 2020).

  Per image ``b``, the logits between all pairs of locations are ``L_b(u, v) = z1(b, u) .
  z2(b, v) / T``. The positives of ``z1(b, u)`` are ``z2(b, u + t)`` for every displacement
  ``t`` in ``[-s, s]^2`` (``s = max_shift``) with ``u + t`` inside the image; every location
  ``v`` of the same image is a candidate (the other locations are the negatives):

    ``l_12 = mean_{(b, u, t) valid} [-log softmax_v L_b(u, v) |_{v = u + t}]``

  and symmetrically ``l_21`` with ``z2`` as anchors, candidates ``z1(b, u)`` over all ``u``
  (``softmax_u L_b(u, v)``) and the same set of positive pairs. The loss is ``(l_12 + l_21) /
  2``, i.e. ``mean over pairs (u, v = u + t) of (lse_v L(u, .) + lse_u L(., v)) / 2 - L(u,
  v)``. ``log N - loss`` (``N = H W`` candidates) is InfoNCE's lower bound on the MI. Cost:
  ``B (H W)^2`` logits (``B (H W)^2 D`` flops): downsample large maps first.

  Args:
    z1, z2: [B, H, W, D], L2-normalised per location (not re-normalised here).
    max_shift: s >= 0, smaller than H and W (0: the same location only).
    temperature: T > 0.
  Returns:
    scalar float32.
  """
  if z1.shape != z2.shape or z1.ndim != 4:
    raise ValueError(f"z1 {z1.shape} and z2 {z2.shape} must be the same [B, H, W, D]")
  _check_window(z1.shape, max_shift)
  b, h, w, d = z1.shape
  z1, z2 = z1.astype(jnp.float32), z2.astype(jnp.float32)
  logits = jnp.einsum("bud,bvd->buv", z1.reshape(b, h * w, d), z2.reshape(b, h * w, d))
  logits = logits / temperature
  lse1 = jax.nn.logsumexp(logits, axis=2).reshape(b, h, w, 1)  # over candidates v of z2
  lse2 = jax.nn.logsumexp(logits, axis=1).reshape(b, h, w, 1)  # over candidates u of z1
  total, count = 0.0, 0
  for dy, dx in _displacements(max_shift):
    a, c = _overlap(z1, z2, dy, dx)  # anchors z1(u), positives z2(u + t)
    lse_a, lse_c = _overlap(lse1, lse2, dy, dx)
    pos = jnp.sum(a * c, axis=-1) / temperature
    total = total + jnp.sum((lse_a[..., 0] + lse_c[..., 0]) / 2.0 - pos)
    count += pos.size
  return total / count
