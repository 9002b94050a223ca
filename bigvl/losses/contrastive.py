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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def pairwise_logits(zimg: Array, ztxt: Array, t: Array | float, b: Array | float = 0.0) -> Array:
  """``t * zimg @ ztxt.T + b``: [N, M] logits, accumulated in float32."""
  dots = jnp.einsum("nd,md->nm", zimg, ztxt, preferred_element_type=jnp.float32)
  return t * dots + b


def sigmoid_loss_terms(logits: Array, positives: Array) -> Array:
  """Per-pair ``-log sigmoid(z * logits)``, ``z = 2*positives - 1``; shape of ``logits``."""
  z = 2.0 * positives.astype(logits.dtype) - 1.0
  return -jax.nn.log_sigmoid(z * logits)


def sigmoid_loss(zimg: Array, ztxt: Array, t: Array | float, b: Array | float,
                 positives: Array | None = None) -> Array:
  """SigLIP / FFF sigmoid loss, ``-mean_i sum_j log sigmoid(z_ij (t <zimg_i, ztxt_j> + b))``.

  Args:
    zimg: [N, D] L2-normalised image embeddings.
    ztxt: [M, D] L2-normalised text embeddings.
    t: the (already exponentiated) temperature, scalar.
    b: the bias, scalar.
    positives: [N, M] 0/1 mask of matching pairs; defaults to the identity (N == M).
  Returns:
    scalar: the sum over text columns, averaged over the N images.
  """
  logits = pairwise_logits(zimg, ztxt, t, b)
  if positives is None:
    if zimg.shape[0] != ztxt.shape[0]:
      raise ValueError(f"positives=None needs N == M, got {zimg.shape[0]} and {ztxt.shape[0]}")
    positives = jnp.eye(zimg.shape[0], dtype=logits.dtype)
  return jnp.sum(sigmoid_loss_terms(logits, positives)) / zimg.shape[0]


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
