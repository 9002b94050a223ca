"""SCL's losses vs float64 numpy loop references: attention alignment, spatial similarity
(symmetry, identical maps, the batched matrix), SupCon, KD, contrastive distillation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.losses.spatial_contrastive import (
  AGGREGATIONS,
  attention_align,
  contrastive_distill_loss,
  global_similarity,
  kd_loss,
  pairwise_spatial_similarity,
  spatial_similarity,
  supcon_loss,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def _maps(rng, n, p=9, d=6, e=5):
  """Random q, k [n, p, d] and v [n, p, e], float32."""
  return tuple(rng.normal(size=(n, p, k)).astype(np.float32) for k in (d, d, e))


# --- float64 references, written from the official ``models/attention.py`` -------------------


def np_align(q_a, k_b, v_b):
  out = np.zeros((q_a.shape[0], v_b.shape[1]))
  for p in range(q_a.shape[0]):
    scores = np.array([q_a[p] @ k_b[r] for r in range(k_b.shape[0])]) / math.sqrt(q_a.shape[1])
    w = np.exp(scores - scores.max())
    out[p] = (w / w.sum()) @ v_b
  return out


def np_cos(x, y):
  return float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-8))


def np_spatial_similarity(qa, ka, va, qb, kb, vb, aggregation="mean"):
  qa, ka, va, qb, kb, vb = (np.float64(t) for t in (qa, ka, va, qb, kb, vb))
  al_b, al_a = np_align(qa, kb, vb), np_align(qb, ka, va)
  c = np.array([np_cos(va[p], al_b[p]) + np_cos(vb[p], al_a[p]) for p in range(len(va))])
  return {"mean": c.mean(), "sum": c.sum(), "max": c.max(),
          "logsum": math.log(np.exp(6.0 * c).sum()) / 6.0}[aggregation]


def test_attention_align_matches_reference():
  q, k, v = _maps(np.random.default_rng(0), 2, p=7, d=4, e=3)
  k_b, v_b = k[1][:5], v[1][:5]  # P' = 5 != P = 7
  np.testing.assert_allclose(attention_align(q[0], k_b, v_b), np_align(*map(np.float64, (
      q[0], k_b, v_b))), **TOL)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_spatial_similarity_matches_reference_and_is_symmetric(aggregation):
  q, k, v = _maps(np.random.default_rng(1), 2)
  a, b = (q[0], k[0], v[0]), (q[1], k[1], v[1])
  s_ab = spatial_similarity(*a, *b, aggregation=aggregation)
  s_ba = spatial_similarity(*b, *a, aggregation=aggregation)
  np.testing.assert_allclose(s_ab, np_spatial_similarity(*a, *b, aggregation), **TOL)
  np.testing.assert_allclose(s_ab, s_ba, rtol=1e-6, atol=1e-6)
  half = spatial_similarity(*a, *b, aggregation=aggregation, directions="mean")
  np.testing.assert_allclose(half, s_ab / 2, rtol=1e-6)


def test_identical_maps_give_the_maximum():
  """``s(a, a)`` is the maximum (2 with the official sum of the two directions, 1 with
  ``directions='mean'``) exactly when every aligned value is parallel to the position's own
  value: (i) a spatially constant map, any projection; (ii) in the limit of peaked
  self-attention, ``q = k = lambda x`` with distinct unit rows ``x_p``, ``lambda -> inf``
  (attention -> identity since ``<x_p, x_p> = 1 > <x_p, x_r>``). For soft attention on a
  generic map it is strictly below: the official definition is not exactly 2 there."""
  rng = np.random.default_rng(2)
  # (i) constant over positions (values may be anything per map, q / k arbitrary)
  p, d, e = 9, 6, 5
  q, k = rng.normal(size=(p, d)), rng.normal(size=(p, d))
  v = np.tile(rng.normal(size=(1, e)), (p, 1))
  a = tuple(np.float32(t) for t in (q, k, v))
  np.testing.assert_allclose(spatial_similarity(*a, *a), 2.0, rtol=1e-6)
  np.testing.assert_allclose(spatial_similarity(*a, *a, directions="mean"), 1.0, rtol=1e-6)
  # (ii) peaked attention
  x = rng.normal(size=(p, d))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  v = rng.normal(size=(p, e)).astype(np.float32)

  def self_sim(lam, directions="sum"):
    qk = np.float32(lam * x)
    return float(spatial_similarity(qk, qk, v, qk, qk, v, directions=directions))

  assert self_sim(1.0) < 2.0 - 1e-2
  assert self_sim(1.0) < self_sim(3.0) < self_sim(10.0)
  np.testing.assert_allclose(self_sim(40.0), 2.0, rtol=1e-5)
  np.testing.assert_allclose(self_sim(40.0, "mean"), 1.0, rtol=1e-5)
  # bounded by the maximum for any pair
  qs, ks, vs = _maps(rng, 4)
  s = pairwise_spatial_similarity(qs, ks, vs)
  assert np.all(np.asarray(s) <= 2.0 + 1e-6) and np.all(np.asarray(s) >= -2.0 - 1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_pairwise_matrix_equals_the_per_pair_function(aggregation):
  n = 6
  q, k, v = _maps(np.random.default_rng(3), n)
  s = np.asarray(pairwise_spatial_similarity(q, k, v, aggregation=aggregation))
  pair = jax.jit(spatial_similarity, static_argnames="aggregation")
  want = np.array([[pair(q[i], k[i], v[i], q[j], k[j], v[j], aggregation=aggregation)
                    for j in range(n)] for i in range(n)])
  np.testing.assert_allclose(s, want, **TOL)
  np.testing.assert_allclose(s, s.T, rtol=1e-6, atol=1e-6)
  chunked = pairwise_spatial_similarity(q, k, v, aggregation=aggregation, chunk_size=2)
  np.testing.assert_allclose(chunked, s, rtol=1e-6, atol=1e-6)
  if aggregation == "mean":
    np.testing.assert_allclose(s[1, 4], np_spatial_similarity(q[1], k[1], v[1], q[4], k[4],
                                                              v[4]), **TOL)
    np.testing.assert_allclose(pairwise_spatial_similarity(q, k, v, directions="mean"), s / 2,
                               rtol=1e-6)


def test_pairwise_gradients_match_with_chunks():
  q, k, v = _maps(np.random.default_rng(4), 4)

  def loss(q, k, v, chunk):
    return jnp.sum(pairwise_spatial_similarity(q, k, v, chunk_size=chunk) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  g, g2 = grad(q, k, v, None), grad(q, k, v, 2)
  for a, b in zip(g, g2, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="must divide"):
    pairwise_spatial_similarity(q, k, v, chunk_size=3)


# --- SupCon ----------------------------------------------------------------------------------


def np_supcon(sim, labels, t):
  """Loop version of the official ``ContrastiveLoss.forward`` (float64)."""
  n = len(labels)
  total = 0.0
  for i in range(n):
    others = [a for a in range(n) if a != i]
    log_denom = math.log(sum(math.exp(sim[i, a] / t) for a in others))
    pos = [p for p in others if labels[p] == labels[i]]
    if pos:
      total += sum(sim[i, p] / t - log_denom for p in pos) / len(pos)
  return -total / n


def test_supcon_matches_reference():
  rng = np.random.default_rng(5)
  z = rng.normal(size=(12, 8))
  labels = np.array([0, 1, 2, 0, 1, 2, 3, 0, 1, 5, 5, 4])  # label 4: an anchor without positives
  sim = np.asarray(global_similarity(np.float32(z)), np.float64)
  for t in (0.1, 0.5, 1.0):
    np.testing.assert_allclose(supcon_loss(np.float32(sim), labels, t),
                               np_supcon(sim, labels, t), rtol=1e-5, atol=1e-5)
  # a spatial similarity matrix works the same way
  q, k, v = _maps(rng, 6)
  s = np.asarray(pairwise_spatial_similarity(q, k, v), np.float64)
  lab = np.array([0, 1, 0, 1, 2, 2])
  np.testing.assert_allclose(supcon_loss(np.float32(s), lab, 0.1), np_supcon(s, lab, 0.1),
                             rtol=1e-5, atol=1e-5)


def test_supcon_is_lower_for_label_consistent_embeddings():
  rng = np.random.default_rng(6)
  labels = np.repeat(np.arange(4), 4)
  centers = rng.normal(size=(4, 16))
  consistent = centers[labels] + 0.1 * rng.normal(size=(16, 16))
  shuffled = consistent[rng.permutation(16)]
  good = supcon_loss(global_similarity(np.float32(consistent)), labels, 0.1)
  bad = supcon_loss(global_similarity(np.float32(shuffled)), labels, 0.1)
  assert float(good) < float(bad) - 1.0
  # two views of a batch: labels repeated, the self-supervised case uses arange twice
  assert np.isfinite(float(supcon_loss(global_similarity(np.float32(consistent)),
                                       np.tile(np.arange(8), 2))))


def test_global_similarity_is_cosine():
  z = np.random.default_rng(7).normal(size=(5, 3)).astype(np.float32)
  want = np.array([[np_cos(np.float64(a), np.float64(b)) for b in z] for a in z])
  np.testing.assert_allclose(global_similarity(z), want, **TOL)


# --- distillation ----------------------------------------------------------------------------


def np_kd(s, t, temp):
  """Official ``DistillKL``: ``kl_div(log_softmax(s/T), softmax(t/T), sum) * T^2 / B``."""
  total = 0.0
  for sb, tb in zip(np.float64(s), np.float64(t), strict=True):
    ps = np.exp(sb / temp - sb.max() / temp)
    ps /= ps.sum()
    pt = np.exp(tb / temp - tb.max() / temp)
    pt /= pt.sum()
    total += sum(pt[k] * (math.log(pt[k]) - math.log(ps[k])) for k in range(len(pt)))
  return total * temp**2 / len(s)


def test_kd_loss():
  rng = np.random.default_rng(8)
  s, t = (rng.normal(scale=3, size=(6, 10)).astype(np.float32) for _ in range(2))
  assert abs(float(kd_loss(s, s))) < 1e-6
  for temp in (1.0, 4.0):
    np.testing.assert_allclose(kd_loss(s, t, temp), np_kd(s, t, temp), rtol=1e-5, atol=1e-6)
  g_t = jax.grad(lambda t: kd_loss(s, t))(t)
  np.testing.assert_array_equal(g_t, 0.0)  # the teacher is a constant


def test_contrastive_distill_loss():
  rng = np.random.default_rng(9)
  s, t = (rng.normal(size=(5, 7)).astype(np.float32) for _ in range(2))
  want = np.mean([2 - 2 * np_cos(np.float64(a), np.float64(b)) for a, b in zip(s, t,
                                                                                 strict=True)])
  np.testing.assert_allclose(contrastive_distill_loss(s, t), want, **TOL)
  assert abs(float(contrastive_distill_loss(s, 3 * s))) < 1e-6
