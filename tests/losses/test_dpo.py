"""DPO / IPO / hinge losses and sequence log-probs vs naive float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.losses.dpo import (
  KINDS,
  dpo_loss,
  sequence_logps,
  sequence_logps_and_counts,
)

TOL = dict(rtol=1e-5, atol=1e-5)


# --- Naive references: float64, explicit loops. ----------------------------------------------


def _np_log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _np_sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def np_dpo_loss_and_grads(pc, pr, rc, rr, beta, eps, kind):
  """(loss, [dL/dpc, dL/dpr, dL/drc, dL/drr]) in float64, by a loop over the batch."""
  pc, pr, rc, rr = (np.asarray(x, np.float64) for x in (pc, pr, rc, rr))
  n = pc.shape[0]
  loss = 0.0
  dh = np.zeros(n)
  for i in range(n):
    h = (pc[i] - rc[i]) - (pr[i] - rr[i])
    if kind == "sigmoid":
      loss += (-(1 - eps) * _np_log_sigmoid(beta * h) - eps * _np_log_sigmoid(-beta * h)) / n
      dh[i] = (-(1 - eps) * beta * _np_sigmoid(-beta * h) + eps * beta * _np_sigmoid(beta * h)) / n
    elif kind == "ipo":
      loss += (h - 1 / (2 * beta)) ** 2 / n
      dh[i] = 2 * (h - 1 / (2 * beta)) / n
    elif kind == "hinge":
      loss += max(0.0, 1 - beta * h) / n
      dh[i] = (-beta if 1 - beta * h > 0 else 0.0) / n
    else:
      raise AssertionError(kind)
  # h = pc - rc - pr + rr
  return loss, [dh, -dh, -dh, dh]


def np_sequence_logps(logits, tokens, mask):
  """(logps, counts) by loops in float64."""
  logits = np.asarray(logits, np.float64)
  b, t, _ = logits.shape
  logps, counts = np.zeros(b), np.zeros(b)
  for i in range(b):
    for s in range(t - 1):
      if mask[i][s + 1]:
        row = logits[i, s]
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        logps[i] += row[tokens[i][s + 1]] - lse
        counts[i] += 1
  return logps, counts


def _logps(rng, n):
  """Four [n] float32 arrays of sequence-log-prob-like values (a few tens, negative)."""
  return [(-30.0 + 8.0 * rng.normal(size=n)).astype(np.float32) for _ in range(4)]


# --- The reference itself. --------------------------------------------------------------------


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_numpy_reference_matches_finite_differences(kind, eps):
  rng = np.random.default_rng(0)
  xs = [x.astype(np.float64) for x in _logps(rng, 3)]
  beta = 0.3
  _, grads = np_dpo_loss_and_grads(*xs, beta, eps, kind)
  d = 1e-6
  for a in range(4):
    for i in range(3):
      up = [x.copy() for x in xs]
      dn = [x.copy() for x in xs]
      up[a][i] += d
      dn[a][i] -= d
      fd = (np_dpo_loss_and_grads(*up, beta, eps, kind)[0]
            - np_dpo_loss_and_grads(*dn, beta, eps, kind)[0]) / (2 * d)
      assert abs(fd - grads[a][i]) < 1e-6


# --- dpo_loss vs reference. ---------------------------------------------------------------------


CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("kind,eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_grads_match_reference(kind, eps, beta):
  rng = np.random.default_rng(KINDS.index(kind) + int(10 * eps) + int(10 * beta))
  xs = _logps(rng, 8)
  hs = (xs[0] - xs[2]) - (xs[1] - xs[3])
  if kind == "hinge":  # Stay away from the kink, and have both sides of it.
    assert np.all(np.abs(1 - beta * hs) > 1e-2)
    assert np.any(1 - beta * hs > 0) and np.any(1 - beta * hs < 0)
  want, want_g = np_dpo_loss_and_grads(*xs, beta, eps, kind)

  fn = jax.jit(lambda *a: dpo_loss(*a, beta=beta, label_smoothing=eps, kind=kind)[0])
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*map(jnp.asarray, xs))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want, **TOL)
  for got, ref in zip(grads, want_g, strict=True):
    np.testing.assert_allclose(got, ref, **TOL)


def test_dpo_loss_traced_beta():
  """beta may be a traced array (e.g. a schedule): same value as a Python float."""
  xs = list(map(jnp.asarray, _logps(np.random.default_rng(7), 5)))
  want = np_dpo_loss_and_grads(*xs, 0.25, 0.0, "ipo")[0]
  got = jax.jit(lambda b: dpo_loss(*xs, beta=b, kind="ipo")[0])(jnp.float32(0.25))
  np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_policy_equals_reference(kind):
  """h = 0: DPO's loss is log 2, and every kind pushes chosen up and rejected down."""
  rng = np.random.default_rng(3)
  chosen = jnp.asarray(-20.0 + rng.normal(size=6), jnp.float32)
  rejected = jnp.asarray(-25.0 + rng.normal(size=6), jnp.float32)
  beta = 0.1
  fn = lambda pc, pr: dpo_loss(pc, pr, chosen, rejected, beta=beta, kind=kind)
  (loss, metrics), (g_c, g_r) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
      chosen, rejected)
  want = {"sigmoid": math.log(2.0), "ipo": 1 / (2 * beta) ** 2, "hinge": 1.0}[kind]
  np.testing.assert_allclose(loss, want, **TOL)
  assert np.all(np.asarray(g_c) < 0) and np.all(np.asarray(g_r) > 0)
  np.testing.assert_allclose(g_c, -np.asarray(g_r), **TOL)
  assert float(metrics["rewards/accuracy"]) == 0.0  # r_c == r_r is not a win.
  assert float(metrics["rewards/margin"]) == 0.0


def test_metrics_on_hand_made_numbers():
  pc = jnp.array([-10.0, -20.0, -5.0, -8.0])
  pr = jnp.array([-12.0, -18.0, -9.0, -8.0])
  rc = jnp.array([-11.0, -20.0, -6.0, -9.0])
  rr = jnp.array([-11.0, -19.0, -6.0, -7.0])
  # chosen ratios 1, 0, 1, 1; rejected ratios -1, 1, -3, -1; margins 2, -1, 4, 2.
  _, m = dpo_loss(pc, pr, rc, rr, beta=0.5)
  want = {"rewards/chosen": 0.5 * 3 / 4, "rewards/rejected": 0.5 * -4 / 4,
          "rewards/accuracy": 3 / 4, "rewards/margin": 0.5 * 7 / 4,
          "logps/chosen": -43 / 4, "logps/rejected": -47 / 4}
  assert set(m) == set(want)
  for k, v in want.items():
    assert m[k].dtype == jnp.float32 and m[k].shape == ()
    np.testing.assert_allclose(m[k], v, rtol=1e-6, err_msg=k)


def test_label_smoothing_is_a_mixture():
  """cDPO: (1 - eps) * DPO(h) + eps * DPO(-h), i.e. DPO with chosen and rejected swapped."""
  xs = list(map(jnp.asarray, _logps(np.random.default_rng(5), 6)))
  pc, pr, rc, rr = xs
  eps = 0.2
  plain = dpo_loss(pc, pr, rc, rr, beta=0.3)[0]
  swapped = dpo_loss(pr, pc, rr, rc, beta=0.3)[0]
  smooth = dpo_loss(pc, pr, rc, rr, beta=0.3, label_smoothing=eps)[0]
  np.testing.assert_allclose(smooth, (1 - eps) * plain + eps * swapped, **TOL)


@pytest.mark.parametrize("kwargs", [
    dict(kind="kto"),
    dict(kind="Sigmoid"),
    dict(label_smoothing=0.5),
    dict(label_smoothing=-0.1),
    dict(kind="ipo", label_smoothing=0.1),
    dict(kind="hinge", label_smoothing=0.1),
    dict(beta=0.0),
])
def test_bad_arguments_raise(kwargs):
  x = jnp.zeros(2)
  kwargs = {"beta": 0.1, **kwargs}
  with pytest.raises(ValueError) as err:
    dpo_loss(x, x, x, x, **kwargs)
  if "kind" in kwargs and "label_smoothing" not in kwargs:
    assert all(k in str(err.value) for k in KINDS)


# --- sequence_logps. -----------------------------------------------------------------------------


def _seq_case(rng, b=3, t=7, v=5):
  logits = (3.0 * rng.normal(size=(b, t, v))).astype(np.float32)
  tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
  mask = np.zeros((b, t), np.float32)
  for i, (prompt, end) in enumerate([(2, 7), (4, 6), (1, 3)][:b]):
    mask[i, prompt:end] = 1.0  # answer after the prompt, then padding
  return logits, tokens, mask


def test_sequence_logps_matches_loop_reference():
  logits, tokens, mask = _seq_case(np.random.default_rng(0))
  want_l, want_c = np_sequence_logps(logits, tokens, mask)
  got_l, got_c = jax.jit(sequence_logps_and_counts)(logits, tokens, mask)
  assert got_l.shape == got_c.shape == (3,)
  assert got_l.dtype == got_c.dtype == jnp.float32
  np.testing.assert_allclose(got_l, want_l, **TOL)
  np.testing.assert_array_equal(got_c, want_c)
  np.testing.assert_array_equal(want_c, [5, 2, 2])
  np.testing.assert_allclose(sequence_logps(logits, tokens, mask), want_l, **TOL)


def test_sequence_logps_ignores_masked_positions():
  """Tokens at masked positions, ``mask[0]``, and the logits that only predict masked tokens
  (including the last position's) do not change the result."""
  rng = np.random.default_rng(1)
  logits, tokens, mask = _seq_case(rng)
  base = np.asarray(sequence_logps(logits, tokens, mask))
  tokens2 = np.where(mask > 0, tokens, (tokens + 1 + rng.integers(0, 3, tokens.shape)) % 5)
  assert np.any(tokens2 != tokens)
  np.testing.assert_allclose(sequence_logps(logits, tokens2, mask), base, rtol=0, atol=0)
  logits2 = logits.copy()
  unused = np.concatenate([mask[:, 1:], np.zeros((3, 1), np.float32)], axis=1) == 0
  logits2[unused] = 100.0 * rng.normal(size=logits2[unused].shape)
  np.testing.assert_allclose(sequence_logps(logits2, tokens, mask), base, rtol=0, atol=0)
  mask2 = mask.copy()
  mask2[:, 0] = 1.0
  np.testing.assert_allclose(sequence_logps(logits, tokens, mask2), base, rtol=0, atol=0)
  # ... while an answer token does.
  tokens3 = tokens.copy()
  tokens3[0, 3] = (tokens3[0, 3] + 1) % 5
  assert np.asarray(sequence_logps(logits, tokens3, mask))[0] != base[0]


def test_sequence_logps_bfloat16_logits_in_float32():
  logits, tokens, mask = _seq_case(np.random.default_rng(2))
  lb = jnp.asarray(logits, jnp.bfloat16)
  want, _ = np_sequence_logps(np.asarray(lb.astype(jnp.float32)), tokens, mask)
  got = sequence_logps(lb, tokens, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, **TOL)
