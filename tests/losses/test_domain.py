"""Checks of bigvl.losses.domain against float64 numpy references and hand values."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.losses import domain as D


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_log_sigmoid(z):
  z = np.asarray(z, np.float64)
  return -np.logaddexp(0.0, -z)


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Gradient reversal and its schedule.
# ---------------------------------------------------------------------------------------------


def test_grad_reverse_forward_identity_and_backward():
  x = jnp.asarray(_rand(0, (3, 4)))
  np.testing.assert_array_equal(D.grad_reverse(x, 0.7), x)
  up = jnp.asarray(_rand(1, (3, 4)))
  _, vjp = jax.vjp(lambda v: D.grad_reverse(v, 0.7), x)
  np.testing.assert_allclose(vjp(up)[0], -0.7 * np.asarray(up), rtol=1e-6)


def test_grad_reverse_composed_and_traced_lam():
  x = jnp.asarray(_rand(2, (5,)))
  f = lambda v: jnp.sin(v) * 2.0
  g = lambda v: jnp.sum(jnp.square(v))

  def loss(v, lam):
    return g(D.grad_reverse(f(v), lam))

  # d/dv g(f(v)) = 2 f(v) * 2 cos(v); reversed: times -lam.
  want = -0.3 * 2.0 * np.asarray(f(x)) * 2.0 * np.cos(np.asarray(x))
  np.testing.assert_allclose(jax.grad(loss)(x, 0.3), want, rtol=1e-5)
  # The forward value is unchanged by the layer.
  np.testing.assert_allclose(loss(x, 0.3), g(f(x)), rtol=1e-6)
  # lam as a traced value under jit, and no gradient into lam.
  gx, glam = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, jnp.float32(0.3))
  np.testing.assert_allclose(gx, want, rtol=1e-5)
  assert float(glam) == 0.0
  gx2 = jax.jit(jax.grad(loss))(x, jnp.float32(2.0))
  np.testing.assert_allclose(gx2, want / 0.3 * 2.0, rtol=1e-5)


def test_grl_coefficient():
  np.testing.assert_allclose(D.grl_coefficient(0, 100), 0.0, atol=1e-7)
  np.testing.assert_allclose(D.grl_coefficient(0, 100, low=0.2, high=0.9), 0.2, atol=1e-6)
  want_end = 2.0 / (1.0 + math.exp(-10.0)) - 1.0
  np.testing.assert_allclose(D.grl_coefficient(100, 100), want_end, rtol=1e-6)
  assert float(D.grl_coefficient(100, 100)) > 0.999
  np.testing.assert_allclose(D.grl_coefficient(500, 100), want_end, rtol=1e-6)  # clipped
  p = 0.25
  want = 2.0 * 0.7 / (1.0 + math.exp(-5.0 * p)) - 0.7 + 0.2
  np.testing.assert_allclose(D.grl_coefficient(25, 100, alpha=5.0, high=0.9, low=0.2), want,
                             rtol=1e-6)
  vals = np.asarray(jax.jit(lambda s: D.grl_coefficient(s, 10))(jnp.arange(11)))
  assert np.all(np.diff(vals) > 0)
  with pytest.raises(ValueError):
    D.grl_coefficient(1, 0)


# ---------------------------------------------------------------------------------------------
# Discriminator loss, CDAN conditioning.
# ---------------------------------------------------------------------------------------------


def _np_domain_bce(zs, zt, ws=None, wt=None):
  ls = -_np_log_sigmoid(zs)
  lt = -_np_log_sigmoid(-np.asarray(zt, np.float64))
  if ws is None:
    return (ls.sum() + lt.sum()) / (ls.size + lt.size)
  ws = np.asarray(ws, np.float64)
  wt = np.asarray(wt, np.float64)
  ws, wt = ws / ws.sum(), wt / wt.sum()
  return ((ws * ls).sum() + (wt * lt).sum()) / (ws.sum() + wt.sum())


def test_domain_bce_against_numpy():
  zs, zt = _rand(3, (4,), 3.0), _rand(4, (3,), 3.0)
  np.testing.assert_allclose(D.domain_bce(jnp.asarray(zs), jnp.asarray(zt)),
                             _np_domain_bce(zs, zt), rtol=1e-5)
  ws = np.array([1.0, 2.0, 1.5, 1.2], np.float32)
  wt = np.array([1.9, 1.1, 1.3], np.float32)
  got = D.domain_bce(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(ws), jnp.asarray(wt))
  np.testing.assert_allclose(got, _np_domain_bce(zs, zt, ws, wt), rtol=1e-5)
  # Large logits stay finite (log_sigmoid).
  big = D.domain_bce(jnp.array([-200.0]), jnp.array([200.0]))
  np.testing.assert_allclose(big, 200.0, rtol=1e-5)
  with pytest.raises(ValueError):
    D.domain_bce(jnp.asarray(zs), jnp.asarray(zt), w_src=jnp.asarray(ws))


def test_domain_bce_gradients():
  zs, zt = _rand(5, (4,), 2.0), _rand(6, (3,), 2.0)
  sig = lambda z: 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  gs, gt = jax.grad(D.domain_bce, argnums=(0, 1))(jnp.asarray(zs), jnp.asarray(zt))
  np.testing.assert_allclose(gs, (sig(zs) - 1.0) / 7, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gt, sig(zt) / 7, rtol=1e-5, atol=1e-7)
  ws = np.array([1.0, 2.0, 1.5, 1.2], np.float32)
  wt = np.array([1.9, 1.1, 1.3], np.float32)
  f = lambda a, b, c, d: D.domain_bce(a, b, c, d)
  gs, gt, gws, gwt = jax.grad(f, argnums=(0, 1, 2, 3))(*map(jnp.asarray, (zs, zt, ws, wt)))
  # sum(w~) = 2 after the per-domain normalisation.
  np.testing.assert_allclose(gs, ws / ws.sum() * (sig(zs) - 1.0) / 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gt, wt / wt.sum() * sig(zt) / 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(gws, 0.0)  # weights are gradient-stopped
  np.testing.assert_array_equal(gwt, 0.0)


def test_entropy_weights():
  logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [60.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(D.entropy_weights(logits), [1.25, 2.0], rtol=1e-6)
  g = jax.grad(lambda z: jnp.sum(D.entropy_weights(z)))(jnp.array([[1.0, 0.0, -1.0]]))
  np.testing.assert_array_equal(g, 0.0)


def test_multilinear_map_against_loops():
  f, g = _rand(7, (2, 3)), _rand(8, (2, 4))
  out = np.asarray(D.multilinear_map(jnp.asarray(f), jnp.asarray(g)))
  assert out.shape == (2, 12)
  want = np.zeros((2, 12))
  for b in range(2):
    for c in range(4):
      for j in range(3):
        want[b, c * 3 + j] = float(g[b, c]) * float(f[b, j])
  np.testing.assert_allclose(out, want, rtol=1e-6)


def test_randomized_multilinear_map():
  r_f, r_g = D.random_projections(jax.random.key(0), 3, 4, 5)
  assert r_f.shape == (3, 5) and r_g.shape == (4, 5)
  assert not np.allclose(r_f[:3, :4], r_g[:3, :4])  # independent draws
  f, g = _rand(9, (2, 3)), _rand(10, (2, 4))
  got = D.randomized_multilinear_map(jnp.asarray(f), jnp.asarray(g), r_f, r_g)
  rf, rg = np.asarray(r_f, np.float64), np.asarray(r_g, np.float64)
  want = (f.astype(np.float64) @ rf) * (g.astype(np.float64) @ rg) / math.sqrt(5)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Pseudo-labels, target consistency, class-level invariance.
# ---------------------------------------------------------------------------------------------


def test_pseudo_labels():
  logits = jnp.log(jnp.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45]]))
  labels, mask = D.pseudo_labels(logits, 0.6)
  np.testing.assert_array_equal(labels, [0, 1, 0])
  assert labels.dtype == jnp.int32
  np.testing.assert_array_equal(mask, [1.0, 1.0, 0.0])
  np.testing.assert_array_equal(D.pseudo_labels(logits, 0.0)[1], [1.0, 1.0, 1.0])


def _np_tc(clean, pert, kind, threshold):
  p, q = _np_softmax(clean), _np_softmax(pert)
  if kind == "kl":
    d = np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0), -1)
  elif kind == "mse":
    d = np.mean((p - q) ** 2, -1)
  else:
    d = -np.log(q[np.arange(len(q)), p.argmax(-1)])
  m = (p.max(-1) >= threshold).astype(np.float64)
  return (m * d).sum() / len(d), m.mean()


@pytest.mark.parametrize("kind", D.KINDS_TC)
def test_target_consistency(kind):
  clean, pert = _rand(11, (4, 3), 2.0), _rand(12, (4, 3), 2.0)
  loss, frac = D.target_consistency(jnp.asarray(clean), jnp.asarray(pert), kind)
  want, _ = _np_tc(clean, pert, kind, 0.0)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(loss) > 0 and float(frac) == 1.0
  # Threshold: masked examples count as zeros, normalised by the whole batch.
  thr = float(np.sort(_np_softmax(clean).max(-1))[1])  # keeps 3 of 4
  loss_t, frac_t = D.target_consistency(jnp.asarray(clean), jnp.asarray(pert), kind, thr)
  want_t, want_frac = _np_tc(clean, pert, kind, thr)
  assert want_frac == 0.75
  np.testing.assert_allclose(frac_t, 0.75)
  np.testing.assert_allclose(loss_t, want_t, rtol=1e-5)
  assert float(loss_t) < float(loss)
  # No gradient into the clean branch; some into the perturbed one.
  g_clean, g_pert = jax.grad(lambda a, b: D.target_consistency(a, b, kind)[0], argnums=(0, 1))(
      jnp.asarray(clean), jnp.asarray(pert))
  np.testing.assert_array_equal(g_clean, 0.0)
  assert float(jnp.abs(g_pert).max()) > 0


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_target_consistency_zero_for_invariant_model(kind):
  z = jnp.asarray(_rand(13, (4, 3), 2.0))
  loss, _ = D.target_consistency(z, z, kind)
  np.testing.assert_allclose(loss, 0.0, atol=1e-7)


def test_target_consistency_ce_invariant_confident_model():
  # CE to the clean argmax is 0 at q = p only when p is one-hot; near one-hot it is ~0, and for
  # a soft invariant prediction it equals -log max p (it also rewards confidence).
  z = jnp.array([[30.0, 0.0, 0.0], [0.0, 0.0, 30.0]])
  np.testing.assert_allclose(D.target_consistency(z, z, "ce")[0], 0.0, atol=1e-6)
  soft = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  np.testing.assert_allclose(D.target_consistency(soft, soft, "ce")[0], math.log(2), rtol=1e-6)


def test_target_consistency_unknown_kind():
  with pytest.raises(ValueError):
    D.target_consistency(jnp.zeros((1, 2)), jnp.zeros((1, 2)), "l1")


def _np_cliv(fs, ys, ft, lt, k, thr):
  p = _np_softmax(lt)
  yt, keep = p.argmax(-1), p.max(-1) >= thr
  dists = []
  for c in range(k):
    s, t = fs[ys == c], ft[(yt == c) & keep]
    if len(s) and len(t):
      dists.append(np.sum((s.astype(np.float64).mean(0) - t.astype(np.float64).mean(0)) ** 2))
  return (np.mean(dists) if dists else 0.0), keep.mean(), len(dists)


def _cliv_case():
  fs = _rand(14, (5, 3))
  ys = np.array([0, 1, 0, 2, 1])  # class 3 absent in the source
  ft = _rand(15, (5, 3))
  # Target predictions: [class 0 conf., class 3 conf., class 1 conf., class 0 unconf., class 2
  # conf.]; class 3 is matched in neither direction since the source lacks it.
  lt = np.full((5, 4), 0.0, np.float32)
  lt[0, 0], lt[1, 3], lt[2, 1], lt[3, 0], lt[4, 2] = 4.0, 4.0, 4.0, 0.5, 4.0
  return fs, ys, ft, lt


def test_class_centroid_alignment_against_numpy():
  fs, ys, ft, lt = _cliv_case()
  for thr in (0.0, 0.8):
    loss, aux = D.class_centroid_alignment(jnp.asarray(fs), jnp.asarray(ys), jnp.asarray(ft),
                                           jnp.asarray(lt), 4, thr)
    want, frac, n = _np_cliv(fs, ys, ft, lt, 4, thr)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["cliv_mask"], frac, rtol=1e-6)
    assert int(aux["cliv_classes"]) == n == 3
  assert frac == 0.8
  # jit-friendly.
  jloss, _ = jax.jit(D.class_centroid_alignment, static_argnums=(4,))(
      jnp.asarray(fs), jnp.asarray(ys), jnp.asarray(ft), jnp.asarray(lt), 4, 0.8)
  np.testing.assert_allclose(jloss, want, rtol=1e-5)


def test_class_centroid_alignment_threshold_and_missing_classes():
  fs, ys, ft, lt = _cliv_case()
  run = lambda ft_: float(D.class_centroid_alignment(jnp.asarray(fs), jnp.asarray(ys),
                                                     jnp.asarray(ft_), jnp.asarray(lt), 4,
                                                     0.8)[0])
  base = run(ft)
  ft_low = ft.copy()
  ft_low[3] += 10.0  # below threshold: ignored
  assert run(ft_low) == base
  ft_miss = ft.copy()
  ft_miss[1] += 10.0  # pseudo-class 3, absent from the source: skipped
  assert run(ft_miss) == base
  ft_high = ft.copy()
  ft_high[0] += 10.0  # confident, class 0 present in both: counts
  assert run(ft_high) > base + 1.0
  # No class shared: 0 and no matched classes.
  loss, aux = D.class_centroid_alignment(jnp.asarray(fs), jnp.zeros(5, jnp.int32),
                                         jnp.asarray(ft), jnp.asarray(lt), 4, 0.99)
  assert float(loss) == 0.0 and int(aux["cliv_classes"]) == 0


def test_class_centroid_alignment_gradients():
  fs, ys, ft, lt = _cliv_case()
  f = lambda a, b, c: D.class_centroid_alignment(a, jnp.asarray(ys), b, c, 4, 0.8)[0]
  gs, gt, gl = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(fs), jnp.asarray(ft), jnp.asarray(lt))
  np.testing.assert_array_equal(gl, 0.0)  # not through the pseudo-labels
  # Analytic: d/dc_s ||c_s - c_t||^2 / |K| = 2 (c_s - c_t) / |K|, spread over the class members.
  _, _, n = _np_cliv(fs, ys, ft, lt, 4, 0.8)
  cs0, ct0 = fs[[0, 2]].astype(np.float64).mean(0), ft[0].astype(np.float64)
  np.testing.assert_allclose(gs[0], 2 * (cs0 - ct0) / n / 2, rtol=1e-5)
  np.testing.assert_allclose(gt[0], -2 * (cs0 - ct0) / n, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(gt)[[1, 3]], 0.0)  # unmatched class / below threshold
