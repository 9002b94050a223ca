"""LFA's adaptive re-ranking loss vs a naive float64 numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.losses.rerank import rerank_loss, rerank_loss_terms


def np_rerank_loss(x, labels, protos, k, s, exclude_positive=False):
  """Float64, loop over anchors: normalise, Euclidean distances, the k nearest prototypes
  (of all classes, or of the wrong ones), mean of the hinge terms."""
  x = np.asarray(x, np.float64)
  protos = np.asarray(protos, np.float64)
  x = x / np.linalg.norm(x, axis=1, keepdims=True)
  protos = protos / np.linalg.norm(protos, axis=1, keepdims=True)
  terms = []
  for n in range(len(x)):
    y = labels[n]
    d = np.sqrt(((x[n][None] - protos) ** 2).sum(-1))
    order = [c for c in np.argsort(d, kind="stable") if not (exclude_positive and c == y)]
    for j in order[:k]:
      margin = (1.0 - protos[j] @ protos[y]) / s
      terms.append(max(0.0, d[y] + margin - d[j]))
  return float(np.mean(terms))


def test_zero_when_every_anchor_beats_its_margins():
  # Orthonormal prototypes; each anchor is its prototype plus a small push: d(n, y) <= 0.1,
  # d(n, j) >= sqrt(2) - 0.1 for j != y, margins (1 - 0) / 4 = 0.25: every hinge is inactive.
  rng = np.random.default_rng(0)
  num_classes, dim = 5, 8
  protos = np.eye(dim, dtype=np.float32)[:num_classes] * rng.uniform(0.5, 2.0, (num_classes, 1))
  labels = rng.integers(0, num_classes, 40)
  x = np.eye(dim)[labels] + 0.03 * rng.normal(size=(40, dim))
  x *= rng.uniform(0.1, 3.0, (40, 1))   # scale does not matter: x W is re-normalised
  for exclude in (False, True):
    loss = rerank_loss(jnp.asarray(x, jnp.float32), jnp.asarray(labels), jnp.asarray(protos),
                       k=3, s=4.0, exclude_positive=exclude)
    assert float(loss) == 0.0
    assert np_rerank_loss(x, labels, protos, 3, 4.0, exclude) == 0.0


@pytest.mark.parametrize("k,s,exclude", [(3, 4.0, False), (1, 4.0, False), (5, 2.0, True),
                                         (50, 4.0, False)])
def test_matches_float64_reference_on_random_data(k, s, exclude):
  rng = np.random.default_rng(k)
  n, num_classes, dim = 64, 10, 16
  x = rng.normal(size=(n, dim)).astype(np.float32)
  protos = rng.normal(size=(num_classes, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, n)
  got = float(rerank_loss(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(protos), k, s,
                          exclude))
  want = np_rerank_loss(x, labels, protos, k, s, exclude)
  assert want > 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_neighbours_are_the_nearest_prototypes_and_the_true_class_counts_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(32, 8)).astype(np.float32)
  protos = rng.normal(size=(6, 8)).astype(np.float32)
  labels = rng.integers(0, 6, 32)
  terms, nbrs = rerank_loss_terms(jnp.asarray(x), jnp.asarray(labels), jnp.asarray(protos), k=3)
  xn = x / np.linalg.norm(x, axis=1, keepdims=True)
  pn = protos / np.linalg.norm(protos, axis=1, keepdims=True)
  d = np.linalg.norm(xn[:, None] - pn[None], axis=-1)
  np.testing.assert_array_equal(np.asarray(nbrs), np.argsort(d, axis=1)[:, :3])
  true_slot = np.asarray(nbrs) == labels[:, None]
  assert true_slot.any()
  np.testing.assert_array_equal(np.asarray(terms)[true_slot], 0.0)


def test_gradient_finite_with_anchor_on_a_prototype():
  protos = jnp.eye(4, 6)
  labels = jnp.array([0, 1, 2])
  w = jnp.eye(6)
  x = jnp.concatenate([protos[:2], protos[3:4]])   # rows 0 and 1 sit on their prototypes

  grad = jax.jit(jax.grad(lambda w: rerank_loss(x @ w, labels, protos)))(w)
  assert np.all(np.isfinite(np.asarray(grad)))
  assert float(rerank_loss(x, labels, protos)) > 0.0   # row 2 is on the wrong prototype
