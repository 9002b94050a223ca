"""bigvl.losses.mutual_info against float64 numpy loops, and the MI's extreme cases."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.losses import mutual_info as MI


def _np_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def _random_probs(seed, shape, scale=2.0):
  return _np_softmax(scale * np.random.default_rng(seed).normal(size=shape))


def _np_joint(p1, p2, s):
  """Explicit loops over displacements and pixels; each displacement's joint is the mean
  over its overlapping pixels."""
  b, h, w, k = p1.shape
  joint = np.zeros((k, k))
  shifts = list(itertools.product(range(-s, s + 1), repeat=2))
  for dy, dx in shifts:
    pt, n = np.zeros((k, k)), 0
    for i in range(b):
      for y in range(h):
        for x in range(w):
          if 0 <= y + dy < h and 0 <= x + dx < w:
            pt += np.outer(p1[i, y, x], p2[i, y + dy, x + dx])
            n += 1
    joint += pt / n
  joint /= len(shifts)
  joint = (joint + joint.T) / 2
  return joint / joint.sum()


def _np_mi(p1, p2, s, lamb=1.0, eps=MI.EPS):
  joint = _np_joint(np.asarray(p1, np.float64), np.asarray(p2, np.float64), s)
  p_i, p_j = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
  joint, p_i, p_j = (np.maximum(v, eps) for v in (joint, p_i, p_j))
  return float(np.sum(joint * (np.log(joint) - lamb * np.log(p_i) - lamb * np.log(p_j))))


def _onehot(labels, k):
  return np.eye(k)[labels]


@pytest.mark.parametrize("s", [0, 1, 2])
def test_joint_matches_loop_reference(s):
  p1, p2 = _random_probs(0, (2, 5, 6, 4)), _random_probs(1, (2, 5, 6, 4))
  got = MI.iic_joint(jnp.asarray(p1, jnp.float32), jnp.asarray(p2, jnp.float32), s)
  assert got.shape == (4, 4) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_joint(p1, p2, s), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got, got.T, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(got), 1.0, rtol=1e-6)


@pytest.mark.parametrize("s,lamb", [(0, 1.0), (1, 1.0), (2, 1.0), (1, 2.0)])
def test_mutual_information_matches_loop_reference(s, lamb):
  # Correlated outputs (p2 a noisy copy of p1), so the MI is far from 0.
  p1 = _random_probs(2, (2, 6, 5, 3), scale=3.0)
  p2 = _np_softmax(np.log(p1) + np.random.default_rng(3).normal(size=p1.shape))
  got = MI.iic_mutual_information(jnp.asarray(p1, jnp.float32), jnp.asarray(p2, jnp.float32),
                                  s, lamb=lamb)
  want = _np_mi(p1, p2, s, lamb)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(MI.iic_loss(jnp.asarray(p1), jnp.asarray(p2), s, lamb), -want,
                             rtol=1e-4, atol=1e-6)
  if (s, lamb) == (0, 1.0):
    assert want > 0.05  # (shifted pixels of these random maps are independent)


def test_mi_is_log_k_for_identical_balanced_one_hot_and_lower_otherwise():
  k, rng = 4, np.random.default_rng(4)
  labels = rng.permutation(np.tile(np.arange(k), 2 * 4 * 4 // k)).reshape(2, 4, 4)
  p = jnp.asarray(_onehot(labels, k), jnp.float32)
  log_k = math.log(k)
  np.testing.assert_allclose(MI.iic_mutual_information(p, p), log_k, rtol=1e-5)
  # Shifted neighbours of random labels disagree: lower.
  assert MI.iic_mutual_information(p, p, max_shift=1) < log_k - 0.1
  # One cluster per image: every displacement agrees, log K again.
  per_image = jnp.asarray(_onehot(np.broadcast_to(np.arange(k)[:, None, None], (k, 5, 5)), k))
  np.testing.assert_allclose(MI.iic_mutual_information(per_image, per_image, max_shift=2),
                             log_k, rtol=1e-5)
  # Mismatched (a random half of the pixels relabelled) and uniform outputs: lower.
  noisy = np.where(rng.random(labels.shape) < 0.5, rng.integers(0, k, labels.shape), labels)
  mismatched = float(MI.iic_mutual_information(p, jnp.asarray(_onehot(noisy, k), jnp.float32)))
  assert 0.05 < mismatched < log_k - 0.1
  uniform = jnp.full(p.shape, 1.0 / k)
  np.testing.assert_allclose(MI.iic_mutual_information(p, uniform), 0.0, atol=1e-6)
  np.testing.assert_allclose(MI.iic_mutual_information(uniform, uniform, 1), 0.0, atol=1e-6)
  # Identical outputs that are all one cluster carry no information: 0.
  allzero = jnp.asarray(_onehot(np.zeros_like(labels), k), jnp.float32)
  np.testing.assert_allclose(MI.iic_mutual_information(allzero, allzero), 0.0, atol=1e-6)


def test_mi_is_zero_for_independent_outputs_with_the_same_marginals():
  p2 = _random_probs(5, (2, 5, 5, 3))
  c = p2.mean((0, 1, 2))
  p1 = np.broadcast_to(c, p2.shape)  # constant: carries no information about p2
  got = MI.iic_mutual_information(jnp.asarray(p1, jnp.float32), jnp.asarray(p2, jnp.float32))
  np.testing.assert_allclose(got, 0.0, atol=1e-6)
  const = jnp.asarray(np.broadcast_to(c, p2.shape), jnp.float32)
  np.testing.assert_allclose(MI.iic_mutual_information(const, const, 2), 0.0, atol=1e-6)
  # The symmetrisation's flip side (documented): constant but different outputs are not 0.
  e1, e2 = (jnp.asarray(np.broadcast_to(np.eye(3)[i], p2.shape), jnp.float32) for i in (0, 1))
  np.testing.assert_allclose(MI.iic_mutual_information(e1, e2), math.log(2), rtol=1e-5)


def test_gradient_is_finite_at_one_hot_outputs():
  labels = np.random.default_rng(6).integers(0, 3, (2, 4, 4))
  logits = jnp.asarray(50.0 * _onehot(labels, 3), jnp.float32)  # saturated softmax

  def loss(l1, l2):
    return MI.iic_loss(jax.nn.softmax(l1), jax.nn.softmax(l2), max_shift=1)

  for g in jax.grad(loss, argnums=(0, 1))(logits, logits):
    assert np.all(np.isfinite(g))
  p = jnp.asarray(_onehot(labels, 3), jnp.float32)
  for g in jax.grad(lambda a, b: MI.iic_loss(a, b, max_shift=1), argnums=(0, 1))(p, p):
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def _np_infonce(z1, z2, s, temperature):
  """Both directions separately, explicit loops over anchors and displacements."""
  b, h, w, d = z1.shape
  losses = []
  for anchors, cands in ((z1, z2), (z2, z1)):
    total, n = 0.0, 0
    for i in range(b):
      flat = cands[i].reshape(h * w, d)
      for y in range(h):
        for x in range(w):
          logits = flat @ anchors[i, y, x] / temperature
          logp = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
          for dy, dx in itertools.product(range(-s, s + 1), repeat=2):
            if 0 <= y + dy < h and 0 <= x + dx < w:
              total -= logp[(y + dy) * w + (x + dx)]
              n += 1
    losses.append(total / n)
  return (losses[0] + losses[1]) / 2


def _unit(seed, shape):
  z = np.random.default_rng(seed).normal(size=shape)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


@pytest.mark.parametrize("s,temperature", [(0, 0.1), (1, 0.1), (2, 0.5)])
def test_spatial_infonce_matches_loop_reference(s, temperature):
  z1 = _unit(7, (2, 4, 5, 6))
  z2 = _unit(8, (2, 4, 5, 6))
  z2 = (z1 + z2) / np.linalg.norm(z1 + z2, axis=-1, keepdims=True)  # correlated
  got = MI.spatial_infonce(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32), s,
                           temperature)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_infonce(z1, z2, s, temperature), rtol=1e-5)


def test_spatial_infonce_is_lower_for_identical_maps_than_shuffled():
  z = _unit(9, (2, 6, 6, 8))
  perm = np.random.default_rng(10).permutation(36)
  shuffled = z.reshape(2, 36, 8)[:, perm].reshape(z.shape)
  loss = jax.jit(MI.spatial_infonce, static_argnums=(2, 3))
  for s in (0, 1):
    same = loss(jnp.asarray(z), jnp.asarray(z), s)
    other = loss(jnp.asarray(z), jnp.asarray(shuffled), s)
    assert same < other - 0.5, (s, same, other)
  g = jax.jit(jax.grad(MI.spatial_infonce), static_argnums=(2,))(
      jnp.asarray(z, jnp.float32), jnp.asarray(shuffled, jnp.float32), 1)
  assert np.all(np.isfinite(g)) and np.abs(g).max() > 0


def test_bad_arguments():
  p = jnp.ones((1, 3, 3, 2)) / 2
  with pytest.raises(ValueError, match="max_shift"):
    MI.iic_joint(p, p, 3)
  with pytest.raises(ValueError, match="same"):
    MI.iic_joint(p, p[..., :1])
  with pytest.raises(ValueError, match="max_shift"):
    MI.spatial_infonce(p, p, -1)
