"""Hand-computed checks of bigvl.losses.consistency."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from bigvl.losses import consistency as C


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_cross_entropy_ids_and_onehot():
  logits = jnp.array([[0.0, 0.0], [math.log(3.0), 0.0]])
  # softmax rows: [1/2, 1/2], [3/4, 1/4].
  np.testing.assert_allclose(C.cross_entropy(logits, jnp.array([0, 1])),
                             [math.log(2), math.log(4)], rtol=1e-6)
  onehot = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(C.cross_entropy(logits, onehot), [math.log(2), math.log(4)],
                             rtol=1e-6)
  soft = jnp.array([[0.5, 0.5], [0.5, 0.5]])
  np.testing.assert_allclose(C.cross_entropy(logits, soft),
                             [math.log(2), 0.5 * (math.log(4 / 3) + math.log(4))], rtol=1e-6)


def test_mse():
  p = jnp.array([[0.6, 0.4], [1.0, 0.0]])
  q = jnp.array([[0.4, 0.6], [0.0, 1.0]])
  np.testing.assert_allclose(C.mse(p, q), [0.04, 1.0], rtol=1e-6)


def test_kl_divergence():
  p = jnp.array([[0.5, 0.5], [1.0, 0.0]])
  q_logits = jnp.log(jnp.array([[0.25, 0.75], [0.5, 0.5]]))
  want = [0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75), math.log(2.0)]
  np.testing.assert_allclose(C.kl_divergence(p, q_logits), want, rtol=1e-6)
  # KL(p || p) = 0.
  np.testing.assert_allclose(C.kl_divergence(p[:1], jnp.log(p[:1])), [0.0], atol=1e-7)


def test_entropy():
  logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(C.entropy(logits), [math.log(4.0), 0.0], atol=1e-6)


def test_sigmoid_rampup():
  np.testing.assert_allclose(C.sigmoid_rampup(0, 100), math.exp(-5.0), rtol=1e-6)
  np.testing.assert_allclose(C.sigmoid_rampup(50, 100), math.exp(-1.25), rtol=1e-6)
  np.testing.assert_allclose(C.sigmoid_rampup(100, 100), 1.0)
  np.testing.assert_allclose(C.sigmoid_rampup(250, 100), 1.0)
  np.testing.assert_allclose(C.sigmoid_rampup(3, 0), 1.0)
  # Traceable in the step.
  np.testing.assert_allclose(jax.jit(lambda s: C.sigmoid_rampup(s, 100))(jnp.int32(50)),
                             math.exp(-1.25), rtol=1e-6)


def test_linear_rampup():
  np.testing.assert_allclose([C.linear_rampup(s, 100) for s in (0, 50, 100, 200)],
                             [0.0, 0.5, 1.0, 1.0])
  np.testing.assert_allclose(C.linear_rampup(7, 0), 1.0)


def test_sharpen():
  # [0.6, 0.4] at T=0.5: [0.36, 0.16] / 0.52.
  np.testing.assert_allclose(C.sharpen(jnp.array([0.6, 0.4]), 0.5), [0.36 / 0.52, 0.16 / 0.52],
                             rtol=1e-6)
  np.testing.assert_allclose(C.sharpen(jnp.array([0.6, 0.4]), 1.0), [0.6, 0.4], rtol=1e-6)
  np.testing.assert_allclose(C.sharpen(jnp.array([0.7, 0.3, 0.0]), 0.01), [1.0, 0.0, 0.0],
                             atol=1e-6)


def test_guess_labels():
  logits_k = jnp.log(jnp.array([[[0.8, 0.2]], [[0.4, 0.6]]]))  # K=2, B=1: mean [0.6, 0.4].
  np.testing.assert_allclose(C.guess_labels(logits_k, 0.5), [[0.36 / 0.52, 0.16 / 0.52]],
                             rtol=1e-5)


def test_temporal_ensemble_update():
  z0 = jnp.zeros((2,))
  z1, t1 = C.temporal_ensemble_update(z0, jnp.array([1.0, 0.0]), 0.6, 1)
  np.testing.assert_allclose(z1, [0.4, 0.0], rtol=1e-6)
  np.testing.assert_allclose(t1, [1.0, 0.0], rtol=1e-6)  # bias-corrected: 0.4 / (1 - 0.6).
  z2, t2 = C.temporal_ensemble_update(z1, jnp.array([0.0, 1.0]), 0.6, 2)
  np.testing.assert_allclose(z2, [0.24, 0.4], rtol=1e-6)
  np.testing.assert_allclose(t2, [0.24 / 0.64, 0.4 / 0.64], rtol=1e-6)


def test_ema_update_scalars_and_trees():
  out = C.ema_update(jnp.float32(1.0), jnp.float32(3.0), 0.9)
  np.testing.assert_allclose(out, 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
  teacher = {"w": jnp.array([0.0, 10.0]), "b": {"c": jnp.array(2.0, jnp.bfloat16)}}
  student = {"w": jnp.array([1.0, 0.0]), "b": {"c": jnp.array(4.0, jnp.float32)}}
  new = C.ema_update(teacher, student, 0.75)
  np.testing.assert_allclose(new["w"], [0.25, 7.5], rtol=1e-6)
  assert new["b"]["c"].dtype == jnp.bfloat16
  np.testing.assert_allclose(float(new["b"]["c"]), 2.5)


def test_sample_mixup_lambda_at_least_half():
  lam = C.sample_mixup_lambda(jax.random.key(0), 0.75, (4096,))
  assert lam.shape == (4096,)
  assert float(lam.min()) >= 0.5 and float(lam.max()) <= 1.0
  # E[max(lam, 1-lam)] for Beta(1, 1) (uniform) is 0.75.
  mean = float(C.sample_mixup_lambda(jax.random.key(1), 1.0, (20000,)).mean())
  assert abs(mean - 0.75) < 0.01
  assert C.sample_mixup_lambda(jax.random.key(2), 0.75).shape == ()


def test_mixup_scalar_and_per_example():
  x1 = jnp.ones((2, 2, 2, 1))
  x2 = jnp.zeros((2, 2, 2, 1))
  y1 = jnp.array([[1.0, 0.0], [1.0, 0.0]])
  y2 = jnp.array([[0.0, 1.0], [0.0, 1.0]])
  x, y = C.mixup(x1, y1, x2, y2, 0.7)
  np.testing.assert_allclose(x, 0.7 * np.ones((2, 2, 2, 1)), rtol=1e-6)
  np.testing.assert_allclose(y, [[0.7, 0.3], [0.7, 0.3]], rtol=1e-6)
  x, y = C.mixup(x1, y1, x2, y2, jnp.array([0.6, 0.9]))
  np.testing.assert_allclose(x[:, 0, 0, 0], [0.6, 0.9], rtol=1e-6)
  np.testing.assert_allclose(y, [[0.6, 0.4], [0.9, 0.1]], rtol=1e-6)


def test_fixmatch_mask_threshold_edge():
  probs = jnp.array([[0.95, 0.05], [0.94, 0.06], [0.5, 0.5], [0.02, 0.98]], jnp.float32)
  thr = float(np.float32(0.95))  # exactly the stored value of the first row's max
  np.testing.assert_array_equal(C.fixmatch_mask(probs, thr), [1.0, 0.0, 0.0, 1.0])


def test_fixmatch_loss():
  # Weak probs [0.96, 0.04] (kept, label 0) and [0.6, 0.4] (masked out).
  weak = jnp.log(jnp.array([[0.96, 0.04], [0.6, 0.4]]))
  strong = jnp.log(jnp.array([[0.5, 0.5], [0.1, 0.9]]))
  # Mean over the whole batch of 2: (log 2 + 0) / 2.
  np.testing.assert_allclose(C.fixmatch_loss(weak, strong, 0.95), math.log(2) / 2, rtol=1e-6)
  np.testing.assert_allclose(C.fixmatch_loss(weak, strong, 0.0),
                             (math.log(2) - math.log(0.1)) / 2, rtol=1e-6)
  # No gradient into the weak branch.
  g = jax.grad(lambda w: C.fixmatch_loss(w, strong, 0.5))(weak)
  np.testing.assert_array_equal(g, 0.0)


def test_pseudo_label_loss():
  logits = jnp.log(jnp.array([[0.75, 0.25], [0.4, 0.6]]))
  np.testing.assert_allclose(C.pseudo_label_loss(logits),
                             -(math.log(0.75) + math.log(0.6)) / 2, rtol=1e-6)
  np.testing.assert_allclose(C.pseudo_label_loss(logits, threshold=0.7), -math.log(0.75) / 2,
                             rtol=1e-6)
  target = jnp.log(jnp.array([[0.1, 0.9], [0.9, 0.1]]))
  np.testing.assert_allclose(C.pseudo_label_loss(logits, target_logits=target),
                             -(math.log(0.25) + math.log(0.4)) / 2, rtol=1e-6)
  # The gradient sees the label as a constant: d/dz CE(z, argmax) = softmax(z) - onehot.
  g = jax.grad(C.pseudo_label_loss)(logits)
  np.testing.assert_allclose(g, np.array([[-0.25, 0.25], [0.4, -0.4]]) / 2, atol=1e-6)


def test_uda_loss():
  weak = jnp.array([[2.0, 0.0], [0.1, 0.0]])  # softmax max: 0.881 (kept), 0.525 (masked).
  strong = jnp.array([[0.5, -0.5], [3.0, 0.0]])
  t = _np_softmax(np.array([2.0, 0.0]) / 0.4)
  q = _np_softmax([0.5, -0.5])
  want = float(np.sum(t * np.log(t / q))) / 2
  np.testing.assert_allclose(C.uda_loss(weak, strong, 0.4, 0.8), want, rtol=1e-5)
  # T=1, threshold=0: plain mean KL(softmax(weak) || softmax(strong)).
  want_all = np.mean([np.sum(a * np.log(a / b))
                      for a, b in zip(_np_softmax(weak), _np_softmax(strong), strict=True)])
  np.testing.assert_allclose(C.uda_loss(weak, strong, 1.0, 0.0), want_all, rtol=1e-5)


def _top_eigvec_kl_hessian(w, x):
  """Top eigenvector of the Hessian of r -> KL(p(x) || softmax(W(x + r))) at r = 0.

  For logits z = W x the Hessian is ``W^T (diag(p) - p p^T) W``.
  """
  p = _np_softmax(w @ x)
  h = w.T @ (np.diag(p) - np.outer(p, p)) @ w
  vals, vecs = np.linalg.eigh(h)
  return vecs[:, -1], vals


def test_vat_direction_matches_top_eigenvector():
  rs = np.random.RandomState(0)
  w = rs.normal(size=(3, 5)).astype(np.float32)
  xs = rs.normal(size=(2, 5)).astype(np.float32)
  logits_fn = lambda x: x @ jnp.asarray(w).T
  r = C.vat_perturbation(logits_fn, jnp.asarray(xs), jax.random.key(0), xi=1e-2, eps=2.0,
                         num_power_iterations=30)
  assert r.shape == xs.shape
  np.testing.assert_allclose(np.linalg.norm(r, axis=1), [2.0, 2.0], rtol=1e-4)
  for b in range(2):
    v, vals = _top_eigvec_kl_hessian(w.astype(np.float64), xs[b].astype(np.float64))
    assert vals[-1] > 1.5 * vals[-2]  # a clear spectral gap, so the iteration converges
    cos = abs(float(np.dot(np.asarray(r[b]), v))) / 2.0
    assert cos > 0.999, cos


def test_vat_one_iteration_is_one_hessian_step():
  """K=1: r ∝ H d0 for the random unit start d0 (checked against numpy)."""
  rs = np.random.RandomState(1)
  w = rs.normal(size=(4, 6))
  x = rs.normal(size=(1, 6))
  rng = jax.random.key(3)
  r = C.vat_perturbation(lambda z: z @ jnp.asarray(w, jnp.float32).T, jnp.asarray(x, jnp.float32),
                         rng, xi=1e-3, eps=1.0, num_power_iterations=1)
  d0 = np.asarray(jax.random.normal(rng, x.shape, jnp.float32), np.float64)[0]
  d0 /= np.linalg.norm(d0)
  p = _np_softmax(w @ x[0])
  hd = w.T @ (np.diag(p) - np.outer(p, p)) @ w @ d0
  np.testing.assert_allclose(np.asarray(r[0]), hd / np.linalg.norm(hd), atol=2e-3)


def test_vat_loss_gradients_and_value():
  w = jnp.asarray(np.random.RandomState(2).normal(size=(3, 4)), jnp.float32)
  x = jnp.asarray(np.random.RandomState(3).normal(size=(5, 4)), jnp.float32)
  rng = jax.random.key(0)

  def loss(w):
    return C.vat_loss(lambda z: z @ w.T, x, rng, xi=1e-3, eps=0.5)

  val, g = jax.value_and_grad(loss)(w)
  assert float(val) > 0.0
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0.0
  # eps -> 0 gives KL -> 0.
  small = C.vat_loss(lambda z: z @ w.T, x, rng, xi=1e-3, eps=1e-4)
  assert float(small) < 1e-6


def _np_kl(p, q):
  return np.sum(p * np.log(p / q), axis=-1)


def test_vat_loss_is_the_kl_at_the_adversarial_direction():
  """vat_loss = mean_b KL(p(x_b) || p(x_b + r_b)) in numpy float64 with r = eps * the top
  eigenvector of the KL's Hessian (the direction VAT approximates), and that KL is several
  times the KL at random directions of the same norm (the Hessian has rank C - 1 = 2 in 16
  input dimensions, so a random direction mostly misses it)."""
  rs = np.random.RandomState(4)
  w = rs.normal(size=(3, 16))
  xs = rs.normal(size=(4, 16))
  eps = 0.05  # small enough for the second-order picture (KL ~ r^T H r / 2) to hold
  logits_fn = lambda z: z @ jnp.asarray(w, jnp.float32).T  # noqa: E731
  got = float(C.vat_loss(logits_fn, jnp.asarray(xs, jnp.float32), jax.random.key(1), xi=1e-2,
                         eps=eps, num_power_iterations=20))
  # The eigenvector's sign is arbitrary and the KL is not exactly even in r: take the sign
  # of the r_adv the loss used (the same call, the same random start).
  r_adv = np.asarray(C.vat_perturbation(logits_fn, jnp.asarray(xs, jnp.float32),
                                        jax.random.key(1), xi=1e-2, eps=eps,
                                        num_power_iterations=20))
  p = _np_softmax(xs @ w.T)
  adv, rand = [], []
  for b in range(len(xs)):
    v, _ = _top_eigvec_kl_hessian(w, xs[b])
    v = v if np.dot(v, r_adv[b]) > 0 else -v
    adv.append(_np_kl(p[b], _np_softmax((xs[b] + eps * v) @ w.T)))
    d = rs.normal(size=(200, 16))
    d = eps * d / np.linalg.norm(d, axis=1, keepdims=True)
    rand.append(_np_kl(p[b], _np_softmax((xs[b] + d) @ w.T)))
  np.testing.assert_allclose(got, np.mean(adv), rtol=2e-3)
  rand = np.array(rand)  # [B, 200]
  assert np.all(np.array(adv) > rand.max(axis=1))
  assert got > 4 * rand.mean()


def test_mse_zero_on_equal():
  p = jnp.array([[0.2, 0.3, 0.5]])
  np.testing.assert_allclose(C.mse(p, p), [0.0], atol=1e-7)


def test_finite_gradients_with_zero_probabilities():
  p = jnp.array([[1.0, 0.0, 0.0]])
  z = jnp.array([[3.0, -200.0, 0.0]])  # softmax underflows to 0 in the middle class
  grads = [
      jax.grad(lambda z: C.kl_divergence(jax.nn.softmax(z), z).sum())(z),
      jax.grad(lambda z: C.sharpen(jax.nn.softmax(z), 0.5).sum())(z),
      jax.grad(lambda z: C.mse(jax.nn.softmax(z), p).sum())(z),
      jax.grad(lambda z: C.entropy(z).sum())(z),
  ]
  for g in grads:
    assert np.all(np.isfinite(g)), g
