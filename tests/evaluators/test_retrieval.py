"""Recall@K against a brute-force reference; zero-shot class embeddings."""

import numpy as np

from bigvl.evaluators.retrieval import recall_at_k
from bigvl.evaluators.zeroshot import class_embeddings


def _reference(zimg, ztxt, k):
  n, c, _ = ztxt.shape
  flat = ztxt.reshape(n * c, -1)
  i2t = t2i = 0
  for i in range(n):
    order = np.argsort(-(flat @ zimg[i]), kind="stable")
    i2t += any(order[r] // c == i for r in range(k))
  for j in range(n * c):
    order = np.argsort(-(zimg @ flat[j]), kind="stable")
    t2i += j // c in order[:k]
  return i2t / n, t2i / (n * c)


def test_recall_matches_brute_force():
  rng = np.random.default_rng(0)
  zimg = rng.normal(size=(30, 8))
  ztxt = zimg[:, None, :] + rng.normal(scale=1.5, size=(30, 3, 8))
  out = recall_at_k(zimg, ztxt, (1, 5))
  for k in (1, 5):
    i2t, t2i = _reference(zimg, ztxt, k)
    assert np.isclose(out[f"i2t_R@{k}"], i2t) and np.isclose(out[f"t2i_R@{k}"], t2i)
  assert 0 < out["i2t_R@1"] < 1  # a non-trivial case


def test_perfect_embeddings_give_recall_one():
  z = np.eye(5)
  out = recall_at_k(z, z[:, None, :], (1,))
  assert out["i2t_R@1"] == out["t2i_R@1"] == 1.0


def test_class_embeddings_average_prompts():
  z = np.array([[1.0, 0], [0, 1.0], [0, 1.0], [0, 1.0]])  # class 0: two prompts
  out = class_embeddings(z, 2, 2)
  np.testing.assert_allclose(out[0], [np.sqrt(0.5), np.sqrt(0.5)], atol=1e-6)
  np.testing.assert_allclose(out[1], [0, 1.0], atol=1e-6)
