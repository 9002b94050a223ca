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

With ground-truth equivalences (a group id per example, e.g. the scene graph of
``shapes_captions/equiv``): :func:`group_positives` is the oracle miner (``truth_ij =
[group(i) == group(owner(j))]``) and :func:`mining_quality` the precision / recall of any
miner's pairs against that truth.

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
  base, has_owner = owner_mask(n, owners)

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


def owner_mask(n: int, txt_owner_ids: Array) -> tuple[Array, Array]:
  """``(base [N, M] bool, has_owner [M] bool)``: ``base_ij = [owner(j) == i]``; a text whose
  owner is outside ``0..N-1`` (``-1``: none) has an all-false column."""
  owners = jnp.asarray(txt_owner_ids, jnp.int32)
  has_owner = (owners >= 0) & (owners < n)
  return (jnp.arange(n)[:, None] == owners[None, :]) & has_owner[None, :], has_owner


def same_group(groups: Array, txt_owner_ids: Array) -> Array:
  """``[N, M]`` bool ``truth_ij = [groups[i] == groups[owner(j)]]``: the ground-truth
  equivalences of a batch whose examples carry a group id (e.g. ``shapes_captions/equiv``'s
  ``concept``: every rendering of one scene graph); texts without owner match nothing."""
  groups = jnp.asarray(groups, jnp.int32)
  owners = jnp.asarray(txt_owner_ids, jnp.int32)
  n = groups.shape[0]
  _, has_owner = owner_mask(n, owners)
  return (groups[:, None] == groups[jnp.clip(owners, 0, n - 1)][None, :]) & has_owner[None, :]


def group_positives(groups: Array, txt_owner_ids: Array) -> MiningResult:
  """Oracle mining: every pair of the same group is positive, ``P_ij = base_ij or
  truth_ij`` (:func:`same_group`). The ceiling a miner can reach on data with known
  equivalences; the per-test counts are 0 (no similarity test ran)."""
  owners = jnp.asarray(txt_owner_ids, jnp.int32)
  base, _ = owner_mask(groups.shape[0], owners)
  pos = base | same_group(groups, owners)
  zero = jnp.zeros((), jnp.int32)
  return MiningResult(positives=pos.astype(jnp.float32), base=base.astype(jnp.float32),
                      num_mined=jnp.sum(pos & ~base, dtype=jnp.int32), num_ii=zero,
                      num_tt=zero, num_it=zero)


def mining_quality(mined: Array, truth: Array, base: Array) -> tuple[Array, Array]:
  """Precision and recall of the mined pairs against the ground truth, over non-base pairs:
  ``precision = |mined & truth| / |mined|``, ``recall = |mined & truth| / |truth & ~base|``
  (each 0/0 -> 0). ``mined``, ``truth``, ``base``: ``[N, M]`` bool."""
  extra = truth & ~base
  hits = jnp.sum(mined & extra, dtype=jnp.float32)
  return (hits / jnp.maximum(jnp.sum(mined, dtype=jnp.float32), 1.0),
          hits / jnp.maximum(jnp.sum(extra, dtype=jnp.float32), 1.0))
