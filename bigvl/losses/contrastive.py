"""Contrastive image-text losses: sigmoid (SigLIP / FFF multi-positive) and softmax (CLIP).

Pure ``jax.numpy`` functions of arrays; no flax. Shapes:
``zimg: [N, D]``, ``ztxt: [M, D]``, both L2-normalised; ``positives: [N, M]`` 0/1.

* SigLIP, Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training":
  ``L = -1/N sum_i sum_j log sigmoid(z_ij * (t <zimg_i, ztxt_j> + b))`` with
  ``z_ij = 2 * positives_ij - 1`` (``+1`` for a matching pair, ``-1`` otherwise).
* FFF, Bulat et al. 2024, "FFF: Fixing Flawed Foundations in contrastive pre-training":
  the same loss with several ones per row of ``positives`` (K captions per image and mined
  false negatives turned into positives).
* CLIP, Radford et al. 2021: symmetric InfoNCE
  ``L = 1/2 (CE(s * zimg ztxt^T, I) + CE(s * ztxt zimg^T, I))``.

Positives as owner ids. Every text carries the global id of the image it describes
(``txt_owner_ids``, ``-1`` for none) and every image its own global id (``img_ids``);
``positives_from_owners`` turns them into the dense mask ``P_ij = [img_ids_i == owner_j]``.
This covers the identity (``owner_j = j``) and K captions per image (K texts sharing an owner).
Mined positives (``bigvl.losses.mining``), whose number varies per row, come on top as a dense
mask or as padded per-image lists of global text indices (``positive_ids_from_mask``).

``ring_sigmoid_loss`` is the chunked, memory-bounded form of ``sigmoid_loss`` for a batch
sharded over devices (SigLIP paper, Sec. 3.3 "Efficient chunked implementation"): text blocks
travel around a ring of devices, so no device ever holds the global ``[N, M]`` logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
AxisName = str | Sequence[str]


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """``x / max(|x|, eps)`` along ``axis`` in float32 (a zero vector stays zero): the unit
  vectors the contrastive, re-ranking and distillation losses compare."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def pairwise_logits(zimg: Array, ztxt: Array, t: Array | float, b: Array | float = 0.0) -> Array:
  """``t * zimg @ ztxt.T + b``: [N, M] logits, accumulated in float32."""
  dots = jnp.einsum("nd,md->nm", zimg, ztxt, preferred_element_type=jnp.float32)
  return t * dots + b


def _pair_weights(pos: Array, pos_weight: Array | None) -> Array | float:
  """``w_i`` where pair (i, j) is positive, 1 where negative (1 everywhere without weights)."""
  if pos_weight is None:
    return 1.0
  return jnp.where(pos, pos_weight.astype(jnp.float32)[:, None], 1.0)


def sigmoid_loss_terms(logits: Array, positives: Array, pos_weight: Array | None = None
                       ) -> Array:
  """Per-pair ``-c_ij log sigmoid(z * logits)``, ``z = 2*positives - 1``, ``c_ij = pos_weight_i``
  on positive pairs and 1 on negatives (``c = 1`` without ``pos_weight``)."""
  z = 2.0 * positives.astype(logits.dtype) - 1.0
  return -jax.nn.log_sigmoid(z * logits) * _pair_weights(positives > 0, pos_weight)


def sigmoid_loss(zimg: Array, ztxt: Array, t: Array | float, b: Array | float,
                 positives: Array | None = None, pos_weight: Array | None = None) -> Array:
  """SigLIP / FFF sigmoid loss, ``-mean_i sum_j c_ij log sigmoid(z_ij (t <zimg_i, ztxt_j> + b))``.

  Args:
    zimg: [N, D] L2-normalised image embeddings.
    ztxt: [M, D] L2-normalised text embeddings.
    t: the (already exponentiated) temperature, scalar.
    b: the bias, scalar.
    positives: [N, M] 0/1 mask of matching pairs; defaults to the identity (N == M).
    pos_weight: optional [N] weight ``c_i`` of image i's positive pairs (negatives keep 1),
      e.g. ``K / |P_i|`` so that every image's positives weigh K in all, however many were
      mined; default: every pair weighs 1 (SigLIP, FFF).
  Returns:
    scalar: the sum over text columns, averaged over the N images.
  """
  logits = pairwise_logits(zimg, ztxt, t, b)
  if positives is None:
    if zimg.shape[0] != ztxt.shape[0]:
      raise ValueError(f"positives=None needs N == M, got {zimg.shape[0]} and {ztxt.shape[0]}")
    positives = jnp.eye(zimg.shape[0], dtype=logits.dtype)
  return jnp.sum(sigmoid_loss_terms(logits, positives, pos_weight)) / zimg.shape[0]


def softmax_contrastive_loss(zimg: Array, ztxt: Array, scale: Array | float) -> Array:
  """CLIP's symmetric cross-entropy over ``scale * zimg @ ztxt.T`` with the diagonal as target.

  Args:
    zimg: [N, D], ztxt: [N, D] L2-normalised; ``scale``: the (exponentiated) logit scale.
  Returns:
    scalar ``(CE_rows + CE_cols) / 2``, each a mean over N.
  """
  logits = pairwise_logits(zimg, ztxt, scale)
  idx = jnp.arange(logits.shape[0])
  img_to_txt = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[idx, idx])
  txt_to_img = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[idx, idx])
  return 0.5 * (img_to_txt + txt_to_img)


# --------------------------------------------------------------------------------------------
# Positives from owner ids.


def positives_from_owners(img_ids: Array, txt_owner_ids: Array, dtype=jnp.float32) -> Array:
  """Dense positives ``P_ij = [img_ids_i == txt_owner_ids_j]``, shape [N, M] in ``dtype``.

  Args:
    img_ids: [N] int, the global id of each image.
    txt_owner_ids: [M] int, the global id of the image each text describes; a negative id
      marks a text that is nobody's positive (e.g. padding).
  """
  img_ids = jnp.asarray(img_ids)
  owners = jnp.asarray(txt_owner_ids)
  pos = (img_ids[:, None] == owners[None, :]) & (owners[None, :] >= 0)
  return pos.astype(dtype)


def positive_ids_from_mask(mask: Array, max_per_row: int) -> tuple[Array, Array]:
  """Per-row column indices of the ones of ``mask``, padded with ``-1``.

  Converts a dense [N, M] positives mask (e.g. base + mined, from ``mining``) into the
  padded sparse form ``ring_sigmoid_loss(extra_pos_txt_ids=...)`` takes, so rows with uneven
  numbers of positives cost ``max_per_row`` ints each instead of M.

  Returns:
    ids: [N, max_per_row] int32, the column indices of up to ``max_per_row`` ones of each row
      (lowest indices first), then ``-1``.
    dropped: scalar int32, the number of ones that did not fit (0 means the lists are exact).
  """
  pos = jnp.asarray(mask) > 0
  m = pos.shape[1]
  k = min(max_per_row, m)
  # Scores put ones first, lower column first among them; top_k keeps that order.
  score = jnp.where(pos, m - jnp.arange(m), 0).astype(jnp.int32)
  vals, idx = jax.lax.top_k(score, k)
  ids = jnp.where(vals > 0, idx, -1).astype(jnp.int32)
  if k < max_per_row:
    ids = jnp.pad(ids, ((0, 0), (0, max_per_row - k)), constant_values=-1)
  dropped = jnp.sum(pos, dtype=jnp.int32) - jnp.sum(ids >= 0, dtype=jnp.int32)
  return ids, dropped


# --------------------------------------------------------------------------------------------
# Ring (chunked) sigmoid loss.


def _axes(axis_name: AxisName) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _varying_axes(x) -> frozenset:
  mat = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset()


def _to_varying(x, axes: frozenset):
  """Casts ``x`` to vary over ``axes`` (shard_map's vma typing); a no-op where it already does."""
  missing = tuple(sorted(axes - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _block_positives(img_ids, owners, blk, m, pos_rows, extra_ids):
  """[n, m] bool positives of the local images against the text block ``blk`` of size m."""
  pos = (img_ids[:, None] == owners[None, :]) & (owners[None, :] >= 0)
  if pos_rows is not None:
    cols = jax.lax.dynamic_slice_in_dim(pos_rows, blk * m, m, axis=1)
    pos = pos | (cols > 0)
  if extra_ids is not None:
    tid = blk * m + jnp.arange(m, dtype=extra_ids.dtype)
    pos = pos | jnp.any(extra_ids[:, :, None] == tid[None, None, :], axis=1)
  return pos


def _block_logits(zimg, txt, t, b):
  dots = jnp.einsum("nd,md->nm", zimg, txt, preferred_element_type=jnp.float32)
  return dots, t * dots + b


def _ring_perm(p: int):
  return [(j, (j + 1) % p) for j in range(p)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_partial(axes, zimg, ztxt, t, b, img_ids, owners, pos_rows, extra_ids, pos_weight):
  return _ring_partial_fwd(axes, zimg, ztxt, t, b, img_ids, owners, pos_rows, extra_ids,
                           pos_weight)[0]


def _ring_partial_fwd(axes, zimg, ztxt, t, b, img_ids, owners, pos_rows, extra_ids, pos_weight):
  p = jax.lax.axis_size(axes)
  me = jax.lax.axis_index(axes)
  n, m = zimg.shape[0], ztxt.shape[0]
  tf, bf = t.astype(jnp.float32), b.astype(jnp.float32)
  perm = _ring_perm(p)

  def block_loss(s, txt, own):
    blk = (me - s) % p  # This device holds the text block of device me - s after s hops.
    _, logits = _block_logits(zimg, txt, tf, bf)
    pos = _block_positives(img_ids, own, blk, m, pos_rows, extra_ids)
    z = 2.0 * pos - 1.0
    # softplus(-z l) == -log_sigmoid(z l)
    return jnp.sum(jax.nn.softplus(-z * logits) * _pair_weights(pos, pos_weight))

  def body(s, carry):
    acc, txt, own = carry
    # Send the block on before computing with it, so the transfer can overlap the matmul.
    nxt_txt, nxt_own = jax.lax.ppermute((txt, own), axes, perm)
    return acc + block_loss(s, txt, own), nxt_txt, nxt_own

  acc = jnp.zeros_like(tf)
  acc, txt, own = jax.lax.fori_loop(0, p - 1, body, (acc, ztxt, owners))
  acc = acc + block_loss(p - 1, txt, own)
  partial = acc / (n * p)
  return partial, (zimg, ztxt, t, b, img_ids, owners, pos_rows, extra_ids, pos_weight)


def _ring_partial_bwd(axes, res, g):
  zimg, ztxt, t, b, img_ids, owners, pos_rows, extra_ids, pos_weight = res
  p = jax.lax.axis_size(axes)
  me = jax.lax.axis_index(axes)
  n, m = zimg.shape[0], ztxt.shape[0]
  tf, bf = t.astype(jnp.float32), b.astype(jnp.float32)
  scale = g.astype(jnp.float32) / (n * p)
  perm = _ring_perm(p)
  zimg32 = zimg.astype(jnp.float32)

  def step(s, dimg, dt, db, txt, own, dtxt):
    blk = (me - s) % p
    dots, logits = _block_logits(zimg, txt, tf, bf)
    pos = _block_positives(img_ids, own, blk, m, pos_rows, extra_ids)
    z = 2.0 * pos - 1.0
    # d/dl c softplus(-z l) = -c z sigmoid(-z l)
    dl = scale * (-z * jax.nn.sigmoid(-z * logits)) * _pair_weights(pos, pos_weight)
    dimg = dimg + tf * jnp.einsum("nm,md->nd", dl, txt.astype(jnp.float32))
    dtxt = dtxt + tf * jnp.einsum("nm,nd->md", dl, zimg32)
    return dimg, dt + jnp.sum(dl * dots), db + jnp.sum(dl), dtxt

  def body(s, carry):
    dimg, dt, db, txt, own, dtxt = carry
    nxt_txt, nxt_own = jax.lax.ppermute((txt, own), axes, perm)
    dimg, dt, db, dtxt = step(s, dimg, dt, db, txt, own, dtxt)
    # The text gradient travels with its block and so is complete after a full lap.
    dtxt = jax.lax.ppermute(dtxt, axes, perm)
    return dimg, dt, db, nxt_txt, nxt_own, dtxt

  zero = jnp.zeros_like(tf)
  init = (jnp.zeros_like(zimg32), zero, zero, ztxt, owners, jnp.zeros_like(ztxt, jnp.float32))
  dimg, dt, db, txt, own, dtxt = jax.lax.fori_loop(0, p - 1, body, init)
  dimg, dt, db, dtxt = step(p - 1, dimg, dt, db, txt, own, dtxt)
  # After p - 1 hops device `me` holds block me + 1 (mod p): one more hop brings it home.
  dtxt = jax.lax.ppermute(dtxt, axes, perm)
  return (dimg.astype(zimg.dtype), dtxt.astype(ztxt.dtype), dt.astype(t.dtype),
          db.astype(b.dtype), None, None, None, None, None)


_ring_partial.defvjp(_ring_partial_fwd, _ring_partial_bwd)


def ring_sigmoid_loss(zimg: Array, ztxt: Array, t: Array | float, b: Array | float, *,
                      axis_name: AxisName, positives: Array | None = None,
                      img_ids: Array | None = None, txt_owner_ids: Array | None = None,
                      extra_pos_txt_ids: Array | None = None,
                      pos_weight: Array | None = None) -> Array:
  """``sigmoid_loss`` over a batch sharded on ``axis_name``, chunked around a ring of devices.

  Call inside ``jax.shard_map`` (with the default ``check_vma=True``) where the batch axis of
  every per-example input is split over ``axis_name`` (a mesh axis or a tuple of them, the
  global order being the row-major device index over those axes, as ``P(axis_name)`` splits).
  With ``p`` devices, ``n`` local images and ``m`` local texts (N = p n, M = p m globally) this
  computes, exactly as the dense loss on the gathered batch,

      L = -1/N sum_{i<N} sum_{j<M} c_ij log sigmoid(z_ij (t <zimg_i, ztxt_j> + b)),
      z_ij = 2 P_ij - 1

  following SigLIP (Zhai et al. 2023, Sec. 3.3): each device keeps its images, and the text
  blocks (with their owner ids) hop ``p - 1`` times to the next device with
  ``jax.lax.ppermute``; after hop s a device holds block ``(me - s) mod p`` and adds the loss of
  its ``[n, m]`` logits chunk. The backward pass is a second lap (``jax.custom_vjp``) that
  recomputes each chunk, accumulates ``dL/dzimg`` locally and lets ``dL/dztxt`` travel with its
  block back to its owner. Temporary memory is O(n m + (n + m) D) per device, never
  O(n M); with K mined/caption positives FFF (Bulat et al. 2024) is the same loss with more ones
  in P.

  Positives: ``P_ij = [img_ids_i == txt_owner_ids_j]`` OR ``positives[i, j]`` OR
  ``j in extra_pos_txt_ids[i]``, j being the global text index; ``c_ij = pos_weight_i`` where
  ``P_ij = 1``, else 1 (all 1 without ``pos_weight``).

  Args:
    zimg: [n, D] local L2-normalised image embeddings.
    ztxt: [m, D] local L2-normalised text embeddings.
    t, b: scalar temperature (already exponentiated) and bias, replicated or not.
    axis_name: the mesh axis name(s) the batch is split over.
    positives: optional [n, M] 0/1 (or bool) rows of the global positives mask for the local
      images, OR-ed with the owner positives (passing the full mined mask, which contains them,
      is fine). Costs n M bytes of input but no n M float temporaries.
    img_ids: optional [n] int global ids of the local images; default ``me * n + arange(n)``.
    txt_owner_ids: optional [m] int global image id each local text belongs to (``-1``: none);
      default the text's global index (identity positives, needs n == m). K captions per image:
      give each of the K texts the same owner.
    extra_pos_txt_ids: optional [n, K] int global text indices that are also positives of each
      local image, padded with ``-1`` (uneven counts per row; see ``positive_ids_from_mask``).
    pos_weight: optional [n] weights of the local images' positive pairs (``sigmoid_loss``).
  Returns:
    The global loss (a scalar, the same on every device: partial sums ``psum``-ed).
  """
  axes = _axes(axis_name)
  p = jax.lax.axis_size(axes)
  me = jax.lax.axis_index(axes)
  n, m = zimg.shape[0], ztxt.shape[0]
  if img_ids is None:
    img_ids = me * n + jnp.arange(n, dtype=jnp.int32)
  if txt_owner_ids is None:
    if n != m:
      raise ValueError(f"txt_owner_ids=None needs n == m, got {n} and {m}")
    txt_owner_ids = me * m + jnp.arange(m, dtype=jnp.int32)
  img_ids = jnp.asarray(img_ids, jnp.int32)
  txt_owner_ids = jnp.asarray(txt_owner_ids, jnp.int32)
  if positives is not None and positives.shape != (n, m * p):
    raise ValueError(f"positives must be the [n, M] = {(n, m * p)} local rows, "
                     f"got {positives.shape}")
  if extra_pos_txt_ids is not None:
    extra_pos_txt_ids = jnp.asarray(extra_pos_txt_ids, jnp.int32)
    if extra_pos_txt_ids.ndim != 2 or extra_pos_txt_ids.shape[0] != n:
      raise ValueError(f"extra_pos_txt_ids must be [n={n}, K], got {extra_pos_txt_ids.shape}")
  if pos_weight is not None and pos_weight.shape != (n,):
    raise ValueError(f"pos_weight must be [n={n}], got {pos_weight.shape}")
  t, b = jnp.asarray(t, jnp.float32), jnp.asarray(b, jnp.float32)

  # Every differentiable input gets the same vma type, so that each custom-vjp cotangent has the
  # type of its primal; the transposes of these casts psum the t/b (and replicated-input)
  # gradients over the devices.
  vma = frozenset(axes).union(*(_varying_axes(x) for x in (zimg, ztxt, t, b)))
  zimg, ztxt, t, b = (_to_varying(x, vma) for x in (zimg, ztxt, t, b))
  img_ids, txt_owner_ids = _to_varying(img_ids, vma), _to_varying(txt_owner_ids, vma)
  partial = _ring_partial(axes, zimg, ztxt, t, b, img_ids, txt_owner_ids, positives,
                          extra_pos_txt_ids, pos_weight)
  return jax.lax.psum(partial, axes)
