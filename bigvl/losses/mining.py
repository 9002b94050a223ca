"""In-batch false-negative mining (FFF, Bulat et al., CVPR 2024, "Fixing incorrect negatives").

Web batches contain near-duplicate images and interchangeable captions, so the one-to-one
SigLIP target marks many true matches as negatives. FFF mines, on the fly, extra positives from
the image-text, image-image and text-text similarities of the batch and trains the sigmoid loss
with the resulting multi-positive assignment matrix. With L2-normalised embeddings
``zimg: [N, D]``, ``ztxt: [M, D]`` and ``owner(j)``, the image (row) text j belongs to:

    base_ij = [owner(j) == i]
    ii_ij   = [cos(zimg_i, zimg_owner(j)) >= thr_ii]              near-duplicate images
    tt_ij   = [exists k: owner(k) == i, cos(ztxt_k, ztxt_j) >= thr_tt]  equivalent captions
    it_ij   = [cos(zimg_i, ztxt_j) >= thr_it]                     direct cross-modal match
    P_ij    = base_ij or ii_ij or tt_ij or it_ij

Thresholds: the exact values of the paper could not be retrieved while writing this, so the
defaults below are our choice, not the paper's: ``thr_ii = thr_tt = 0.95`` keep only near
duplicates for in-modality cosines, and ``thr_it = 0.5`` is a conservative cross-modal
threshold (mismatched image-text cosines of CLIP/SigLIP-style models are typically well below
it). They depend on the embedding model and should be calibrated; ``None`` disables a test.

Mining runs on the gathered (global) batch, outside the gradient (inputs are
``stop_gradient``-ed), and the mask feeds ``sigmoid_loss(positives=...)`` or, sharded by rows,
``ring_sigmoid_loss(positives=...)``. Cost: O(N^2 + M^2 + N M) similarities, no N M^2 terms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_THR_II = 0.95
DEFAULT_THR_TT = 0.95
DEFAULT_THR_IT = 0.5


class MiningResult(NamedTuple):
  """Output of ``mine_positives``.

  positives: [N, M] float32 0/1, base OR mined.
  base: [N, M] float32 0/1, the owner positives alone.
  num_mined: scalar int32, the pairs positive in ``positives`` but not in ``base``.
  num_ii, num_tt, num_it: scalar int32, the non-base pairs each test fires on (they may overlap,
    so they can sum to more than ``num_mined``).
  """
  positives: Array
  base: Array
  num_mined: Array
  num_ii: Array
  num_tt: Array
  num_it: Array


def _cos(a: Array, b: Array) -> Array:
  return jnp.einsum("nd,md->nm", a, b, preferred_element_type=jnp.float32)


def mine_positives(zimg: Array, ztxt: Array, txt_owner_ids: Array, *,
                   thr_ii: float | None = DEFAULT_THR_II,
                   thr_tt: float | None = DEFAULT_THR_TT,
                   thr_it: float | None = DEFAULT_THR_IT) -> MiningResult:
  """FFF positives mask for a batch: the owner positives plus mined false negatives.

  Args:
    zimg: [N, D] L2-normalised image embeddings (row i is image i).
    ztxt: [M, D] L2-normalised text embeddings.
    txt_owner_ids: [M] int, the row in ``zimg`` of the image each text belongs to (``-1``: none;
      such a text is only ever mined through ``thr_it``). K captions per image: K texts with the
      same owner.
    thr_ii: image-image cosine at or above which two images are near duplicates: image i becomes
      a positive of every text of the other image. ``None`` disables.
    thr_tt: text-text cosine at or above which two texts are equivalent: text j becomes a
      positive of every image owning a text equivalent to it. ``None`` disables.
    thr_it: image-text cosine at or above which (i, j) is a positive. ``None`` disables.
  Returns:
    A ``MiningResult``; see the module docstring for the rule.
  """
  zimg = jax.lax.stop_gradient(zimg)
  ztxt = jax.lax.stop_gradient(ztxt)
  owners = jnp.asarray(txt_owner_ids, jnp.int32)
  n, m = zimg.shape[0], ztxt.shape[0]
  has_owner = (owners >= 0) & (owners < n)
  base = (jnp.arange(n)[:, None] == owners[None, :]) & has_owner[None, :]

  false = jnp.zeros((n, m), bool)
  ii = tt = it = false
  if thr_ii is not None:
    near = _cos(zimg, zimg) >= thr_ii  # [N, N]
    ii = near[:, jnp.clip(owners, 0, n - 1)] & has_owner[None, :]
  if thr_tt is not None:
    equiv = (_cos(ztxt, ztxt) >= thr_tt).astype(jnp.int32)  # [M, M]
    # tt[i, j] = max_{k: owner(k) = i} equiv[k, j]; texts without owner are dropped.
    tt = jax.ops.segment_max(equiv, jnp.where(has_owner, owners, -1), num_segments=n) > 0
  if thr_it is not None:
    it = _cos(zimg, ztxt) >= thr_it

  pos = base | ii | tt | it
  count = lambda x: jnp.sum(x & ~base, dtype=jnp.int32)
  return MiningResult(
      positives=pos.astype(jnp.float32),
      base=base.astype(jnp.float32),
      num_mined=count(pos),
      num_ii=count(ii), num_tt=count(tt), num_it=count(it))
