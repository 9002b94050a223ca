"""SCL's losses: attention-aligned spatial similarity, supervised contrastive loss, and the
distillation stage's KD and contrastive-distillation terms.

Ouali, Hudelot, Tami, ECML-PKDD 2021, "Spatial Contrastive Learning for Few-Shot
Classification" (arXiv 2012.13831), official code github.com/yassouali/SCL
(``models/attention.py``, ``losses.py``). Pure ``jax.numpy``; no flax.

**Spatial similarity.** A feature map with ``P = h w`` positions is projected per position to
queries, keys and values ``Q, K [P, d]``, ``V [P, e]``
(``bigvl.models.resnet12.SpatialProjection``; official ``d = e = 80``). Map ``b`` aligned to
map ``a``'s positions is

    align(a <- b) = softmax(Q_a K_b^T / sqrt(d)) V_b                      [P_a, e]

and the similarity of the pair is the sum of the two directions, averaged over positions:

    s(a, b) = 1/P sum_p [ cos(V_a[p], align(a <- b)[p]) + cos(V_b[p], align(b <- a)[p]) ]

(official ``aggregation='mean'``; also ``'sum'``, ``'max'``, and ``'logsum'`` =
``log(sum_p exp(6 c_p)) / 6``, all over the per-position sum ``c_p`` of the two cosines).
It is symmetric, ``s(a, b) = s(b, a)``, and lies in ``[-2, 2]``. ``directions='mean'``
halves it to ``[-1, 1]``.

*Identical maps.* ``s(a, a) = 2 mean_p cos(V_a[p], sum_q A_pq V_a[q])`` with the
self-attention ``A = softmax(Q_a K_a^T / sqrt(d))`` is the maximum 2 (1 with
``directions='mean'``) exactly when every aligned value points along the position's own
value: always when all positions' values are parallel (e.g. a spatially constant map), and
in the limit of peaked attention ``A -> I`` (e.g. ``Q = K = lambda X`` with distinct unit
rows, ``lambda -> inf``). For a generic map with soft attention, ``s(a, a) < 2``: the
official definition does not give exactly 2 (or 1) for identical maps.

**Supervised contrastive loss** (Khosla et al. 2020, "Supervised Contrastive Learning",
the ``L_out`` form, as SCL's ``ContrastiveLoss``) over a precomputed similarity matrix, so the
same function serves the spatial term (``s`` above) and the global one (cosine of the
projected pooled features). Official temperature 0.1 for both (the code multiplies by the
inverse temperature 10).

**Distillation** (official ``train_distillation.py``): ``kd_loss`` (Hinton et al. 2015,
temperature 4) and ``contrastive_distill_loss`` ``2 - 2 cos`` between the student's and the
teacher's pooled features.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bigvl.losses.contrastive import l2_normalize

Array = jax.Array

AGGREGATIONS = ("mean", "sum", "max", "logsum")
#: Official ``lambda_lse`` of the ``'logsum'`` aggregation.
LOGSUM_LAMBDA = 6.0
_COS_EPS = 1e-8


def _cosine(x: Array, y: Array) -> Array:
  """``<x, y> / max(|x| |y|, eps)`` over the last axis (``torch.nn.CosineSimilarity``)."""
  dot = jnp.sum(x * y, axis=-1)
  norms = jnp.sqrt(jnp.sum(x * x, axis=-1) * jnp.sum(y * y, axis=-1))
  return dot / jnp.maximum(norms, _COS_EPS)


def attention_align(q_a: Array, k_b: Array, v_b: Array) -> Array:
  """``softmax(q_a k_b^T / sqrt(d)) v_b``: map b's values at map a's positions.

  Args:
    q_a: ``[..., P, d]`` queries of map a.
    k_b: ``[..., P', d]`` keys of map b.
    v_b: ``[..., P', e]`` values of map b.
  Returns:
    ``[..., P, e]`` (float32).
  """
  scores = jnp.einsum("...pd,...qd->...pq", q_a, k_b, preferred_element_type=jnp.float32)
  attn = jax.nn.softmax(scores / math.sqrt(q_a.shape[-1]), axis=-1)
  return jnp.einsum("...pq,...qe->...pe", attn, v_b.astype(jnp.float32))


def _aggregate(c: Array, aggregation: str) -> Array:
  """Reduces per-position similarities ``c [..., P]`` over the last axis."""
  if aggregation == "mean":
    return jnp.mean(c, axis=-1)
  if aggregation == "sum":
    return jnp.sum(c, axis=-1)
  if aggregation == "max":
    return jnp.max(c, axis=-1)
  if aggregation == "logsum":
    return jax.nn.logsumexp(LOGSUM_LAMBDA * c, axis=-1) / LOGSUM_LAMBDA
  raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def _directions_factor(directions: str) -> float:
  if directions not in ("sum", "mean"):
    raise ValueError(f"directions must be 'sum' (official) or 'mean', got {directions!r}")
  return 1.0 if directions == "sum" else 0.5


def spatial_similarity(q_a: Array, k_a: Array, v_a: Array, q_b: Array, k_b: Array,
                       v_b: Array, aggregation: str = "mean", directions: str = "sum"
                       ) -> Array:
  """SCL's spatial similarity of one pair of maps (module docstring):
  ``agg_p [cos(v_a[p], align(a <- b)[p]) + cos(v_b[p], align(b <- a)[p])]``.

  Args:
    q_a, k_a: ``[P, d]``; v_a: ``[P, e]`` (map a); q_b, k_b, v_b: the same for map b (same
      ``P``: the two directions are added position by position, as in the official code).
    aggregation: over positions, ``'mean'`` (official default), ``'sum'``, ``'max'``,
      ``'logsum'``.
    directions: ``'sum'`` (official, in ``[-2, 2]``) or ``'mean'`` (halved, ``[-1, 1]``).
  Returns:
    scalar float32.
  """
  c = _cosine(v_a, attention_align(q_a, k_b, v_b)) + _cosine(v_b, attention_align(q_b, k_a, v_a))
  return _directions_factor(directions) * _aggregate(c, aggregation)


def pairwise_spatial_similarity(q: Array, k: Array, v: Array, aggregation: str = "mean",
                                directions: str = "sum", chunk_size: int | None = None
                                ) -> Array:
  """``S[i, j] = spatial_similarity(q_i, k_i, v_i, q_j, k_j, v_j)`` for all pairs of a batch.

  One direction is computed, ``C[i, j, p] = cos(v_i[p], align(i <- j)[p])``, and
  ``S = agg_p(C + C^T)`` (transposing ``i, j``), so each pair's attention is computed once per
  direction (the official code builds both ``[N, N, P, P]`` attention tensors).

  Memory: the attention weights ``[N, N, P, P]`` and the aligned values ``[N, N, P, e]``
  (float32, and the same again for their gradients), i.e. ``N^2 P (P + e)`` floats; N = 128
  (two views of 64), P = 25, e = 80: 43M floats, 172 MB. ``chunk_size`` computes
  ``chunk_size`` rows i at a time (``lax.map``), bounding this to ``chunk_size N P (P + e)``;
  only ``C [N, N, P]`` is kept whole.

  Args:
    q: ``[N, P, d]``, k: ``[N, P, d]``, v: ``[N, P, e]``.
    aggregation, directions: as :func:`spatial_similarity`.
    chunk_size: rows per chunk (must divide N); None: all at once.
  Returns:
    ``[N, N]`` float32, symmetric.
  """
  n = q.shape[0]
  v32 = v.astype(jnp.float32)

  def rows(args: tuple[Array, Array]) -> Array:
    q_i, v_i = args                                               # [c, P, d], [c, P, e]
    aligned = attention_align(q_i[:, None], k[None], v32[None])    # [c, N, P, e]
    return _cosine(v_i[:, None], aligned)                          # [c, N, P]

  if chunk_size is None or chunk_size >= n:
    c = rows((q, v32))
  else:
    if n % chunk_size:
      raise ValueError(f"chunk_size {chunk_size} must divide the batch {n}")
    m = n // chunk_size
    c = jax.lax.map(rows, (q.reshape(m, chunk_size, *q.shape[1:]),
                           v32.reshape(m, chunk_size, *v.shape[1:])))
    c = c.reshape(n, n, q.shape[1])
  both = c + jnp.swapaxes(c, 0, 1)
  return _directions_factor(directions) * _aggregate(both, aggregation)


def global_similarity(z: Array) -> Array:
  """``[N, N]`` cosine similarities of ``z [N, D]`` (the global term's matrix: rows
  L2-normalised, then ``z z^T``)."""
  z = l2_normalize(z)
  return z @ z.T


def supcon_loss(similarity: Array, labels: Array, temperature: float | Array = 0.1) -> Array:
  """Supervised contrastive loss, ``L_out`` (Khosla et al. 2020), as SCL's ``ContrastiveLoss``:

      L = -1/N sum_i 1/|P(i)| sum_{p in P(i)} log( exp(s_ip / t) / sum_{a != i} exp(s_ia / t) )

  with ``P(i) = {p != i : y_p = y_i}``. Self-pairs are excluded from the positives and the
  denominator. An anchor without positives contributes 0 but still counts in ``N`` (the
  official code sets ``|P(i)| = 1`` there). No ``t / t_base`` factor (SupCon's code has one;
  SCL's does not). Two views of a batch of ``B`` are ``N = 2B`` rows with the labels
  repeated; the self-supervised case is ``labels = [0..B-1, 0..B-1]``.

  Args:
    similarity: ``[N, N]`` (spatial: :func:`pairwise_spatial_similarity`; global:
      :func:`global_similarity`).
    labels: ``[N]`` int.
    temperature: ``t`` (official 0.1 for both terms, written as inverse temperature 10).
  Returns:
    scalar float32.
  """
  n = similarity.shape[0]
  logits = similarity.astype(jnp.float32) / temperature
  not_self = ~jnp.eye(n, dtype=bool)
  log_denom = jax.nn.logsumexp(jnp.where(not_self, logits, -jnp.inf), axis=1, keepdims=True)
  log_prob = logits - log_denom
  positives = (labels[:, None] == labels[None, :]) & not_self
  num_pos = jnp.sum(positives, axis=1)
  mean_log_prob_pos = (jnp.sum(jnp.where(positives, log_prob, 0.0), axis=1)
                       / jnp.maximum(num_pos, 1))
  return -jnp.mean(mean_log_prob_pos)


def kd_loss(student_logits: Array, teacher_logits: Array, temperature: float = 4.0) -> Array:
  """Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural
  Network"), SCL's ``DistillKL``:

      L = T^2 / B sum_b KL(softmax(t_b / T) || softmax(s_b / T))

  The teacher is a constant (``stop_gradient``; the official code runs it under no_grad).

  Args:
    student_logits, teacher_logits: ``[B, K]``.
    temperature: ``T`` (official ``kd_T`` 4).
  Returns:
    scalar float32.
  """
  t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  log_p_t = jax.nn.log_softmax(t, axis=-1)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  return temperature**2 * jnp.mean(kl)


def contrastive_distill_loss(student: Array, teacher: Array) -> Array:
  """SCL's contrastive distillation ``mean_b (2 - 2 cos(student_b, teacher_b))`` (= the mean
  squared distance of the L2-normalised rows), on ``[B, D]`` features; official: the pooled
  backbone features, weight 10. The teacher is a constant (``stop_gradient``)."""
  s = l2_normalize(student)
  t = l2_normalize(jax.lax.stop_gradient(teacher))
  return jnp.mean(2.0 - 2.0 * jnp.sum(s * t, axis=-1))
