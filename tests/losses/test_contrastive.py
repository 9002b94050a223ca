"""Contrastive losses vs naive float64 numpy references; ring (sharded) loss vs dense loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from bigvl.losses.contrastive import (
  positive_ids_from_mask,
  positives_from_owners,
  ring_sigmoid_loss,
  sigmoid_loss,
  softmax_contrastive_loss,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def _unit(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --- Naive references: float64, explicit loops. ----------------------------------------------


def _np_log_sigmoid(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _np_sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def np_sigmoid_loss_and_grads(zimg, ztxt, t, b, pos, w=None):
  """Returns (loss, dzimg, dztxt, dt, db), all by loops in float64; ``w[i]`` weighs image i's
  positive pairs."""
  zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
  n, m = zimg.shape[0], ztxt.shape[0]
  loss, dt, db = 0.0, 0.0, 0.0
  dzimg, dztxt = np.zeros_like(zimg), np.zeros_like(ztxt)
  for i in range(n):
    for j in range(m):
      dot = float(np.dot(zimg[i], ztxt[j]))
      z = 1.0 if pos[i][j] else -1.0
      c = float(w[i]) if (w is not None and pos[i][j]) else 1.0
      logit = t * dot + b
      loss -= c * _np_log_sigmoid(z * logit) / n
      dl = -c * z * _np_sigmoid(-z * logit) / n  # d(-c log sigmoid(z l))/dl
      dzimg[i] += dl * t * ztxt[j]
      dztxt[j] += dl * t * zimg[i]
      dt += dl * dot
      db += dl
  return loss, dzimg, dztxt, dt, db


def np_softmax_loss_and_grads(zimg, ztxt, s):
  """CLIP loss and its analytic gradient, by loops in float64."""
  zimg, ztxt = np.asarray(zimg, np.float64), np.asarray(ztxt, np.float64)
  n = zimg.shape[0]
  dots = [[float(np.dot(zimg[i], ztxt[j])) for j in range(n)] for i in range(n)]
  lg = [[s * dots[i][j] for j in range(n)] for i in range(n)]
  loss = 0.0
  g = [[0.0] * n for _ in range(n)]  # dL/dlogits
  for i in range(n):  # image -> text, rows
    mx = max(lg[i])
    lse = mx + math.log(sum(math.exp(v - mx) for v in lg[i]))
    loss += 0.5 * (lse - lg[i][i]) / n
    for j in range(n):
      g[i][j] += 0.5 * (math.exp(lg[i][j] - lse) - (i == j)) / n
  for j in range(n):  # text -> image, columns
    col = [lg[i][j] for i in range(n)]
    mx = max(col)
    lse = mx + math.log(sum(math.exp(v - mx) for v in col))
    loss += 0.5 * (lse - lg[j][j]) / n
    for i in range(n):
      g[i][j] += 0.5 * (math.exp(lg[i][j] - lse) - (i == j)) / n
  dzimg, dztxt, ds = np.zeros_like(zimg), np.zeros_like(ztxt), 0.0
  for i in range(n):
    for j in range(n):
      dzimg[i] += g[i][j] * s * ztxt[j]
      dztxt[j] += g[i][j] * s * zimg[i]
      ds += g[i][j] * dots[i][j]
  return loss, dzimg, dztxt, ds


def _uneven_mask(rng, n, m):
  """Row i has (i mod 5) random positives besides the diagonal block: 0..4 extra per row."""
  mask = np.zeros((n, m), np.float32)
  for i in range(n):
    mask[i, rng.choice(m, size=i % 5, replace=False)] = 1.0
  return mask


# --- The references themselves. ---------------------------------------------------------------


def test_numpy_references_match_finite_differences():
  rng = np.random.default_rng(0)
  zi, zt = _unit(rng, 3, 4).astype(np.float64), _unit(rng, 4, 4).astype(np.float64)
  pos = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]])
  f = lambda a, c, t, b: np_sigmoid_loss_and_grads(a, c, t, b, pos)[0]
  _, dzi, dzt, dt, db = np_sigmoid_loss_and_grads(zi, zt, 3.0, -1.0, pos)
  eps = 1e-6
  for arr, grad, fn in ((zi, dzi, lambda x: f(x, zt, 3.0, -1.0)),
                        (zt, dzt, lambda x: f(zi, x, 3.0, -1.0))):
    for idx in np.ndindex(arr.shape):
      up, dn = arr.copy(), arr.copy()
      up[idx] += eps
      dn[idx] -= eps
      assert abs((fn(up) - fn(dn)) / (2 * eps) - grad[idx]) < 1e-6
  assert abs((f(zi, zt, 3 + eps, -1) - f(zi, zt, 3 - eps, -1)) / (2 * eps) - dt) < 1e-6
  assert abs((f(zi, zt, 3, -1 + eps) - f(zi, zt, 3, -1 - eps)) / (2 * eps) - db) < 1e-6

  zt3 = zt[:3]
  g = lambda a, c, s: np_softmax_loss_and_grads(a, c, s)[0]
  _, dzi, dzt, ds = np_softmax_loss_and_grads(zi, zt3, 5.0)
  for arr, grad, fn in ((zi, dzi, lambda x: g(x, zt3, 5.0)), (zt3, dzt, lambda x: g(zi, x, 5.0))):
    for idx in np.ndindex(arr.shape):
      up, dn = arr.copy(), arr.copy()
      up[idx] += eps
      dn[idx] -= eps
      assert abs((fn(up) - fn(dn)) / (2 * eps) - grad[idx]) < 1e-6
  assert abs((g(zi, zt3, 5 + eps) - g(zi, zt3, 5 - eps)) / (2 * eps) - ds) < 1e-6


# --- Dense losses vs references. ----------------------------------------------------------------


def _check_sigmoid(zi, zt, t, b, mask, positives_arg, w=None):
  want = np_sigmoid_loss_and_grads(zi, zt, t, b, mask, w)
  fn = lambda a, c, t_, b_: sigmoid_loss(a, c, t_, b_, positives=positives_arg,
                                         pos_weight=None if w is None else jnp.asarray(w))
  loss, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(zi, zt, jnp.float32(t),
                                                            jnp.float32(b))
  np.testing.assert_allclose(loss, want[0], **TOL)
  for got, ref in zip(grads, want[1:], strict=True):
    np.testing.assert_allclose(got, ref, **TOL)


def test_sigmoid_loss_identity():
  rng = np.random.default_rng(1)
  zi, zt = _unit(rng, 12, 8), _unit(rng, 12, 8)
  _check_sigmoid(zi, zt, 10.0, -10.0, np.eye(12), None)


def test_sigmoid_loss_uneven_multi_positive():
  rng = np.random.default_rng(2)
  zi, zt = _unit(rng, 10, 8), _unit(rng, 14, 8)
  mask = _uneven_mask(rng, 10, 14)
  assert len(set(mask.sum(1).tolist())) > 2  # really uneven, including empty rows
  _check_sigmoid(zi, zt, 7.0, -3.0, mask, jnp.asarray(mask))


def test_sigmoid_loss_weighted_positives():
  """``pos_weight`` scales image i's positive terms only: K / |P_i| per row here."""
  rng = np.random.default_rng(4)
  zi, zt = _unit(rng, 10, 8), _unit(rng, 14, 8)
  mask = np.maximum(_uneven_mask(rng, 10, 14), np.eye(10, 14, dtype=np.float32))
  w = (1.0 / mask.sum(1)).astype(np.float32)
  assert len(set(w.tolist())) > 2
  _check_sigmoid(zi, zt, 7.0, -3.0, mask, jnp.asarray(mask), w)


def test_sigmoid_loss_k_captions_per_image():
  rng = np.random.default_rng(3)
  n, k = 6, 3
  zi, zt = _unit(rng, n, 8), _unit(rng, n * k, 8)
  owners = rng.permutation(np.repeat(np.arange(n), k))
  mask = np.array([[float(owners[j] == i) for j in range(n * k)] for i in range(n)])
  np.testing.assert_array_equal(positives_from_owners(np.arange(n), owners), mask)
  _check_sigmoid(zi, zt, 10.0, -5.0, mask, positives_from_owners(np.arange(n), owners))


def test_softmax_contrastive_loss():
  rng = np.random.default_rng(4)
  zi, zt = _unit(rng, 9, 8), _unit(rng, 9, 8)
  want = np_softmax_loss_and_grads(zi, zt, 20.0)
  loss, grads = jax.value_and_grad(softmax_contrastive_loss, argnums=(0, 1, 2))(
      zi, zt, jnp.float32(20.0))
  np.testing.assert_allclose(loss, want[0], **TOL)
  for got, ref in zip(grads, want[1:], strict=True):
    np.testing.assert_allclose(got, ref, **TOL)


def test_positives_from_owners_ignores_negative_owner():
  got = positives_from_owners(jnp.array([0, 1, -1]), jnp.array([1, -1, 0, 1]))
  np.testing.assert_array_equal(got, [[0, 0, 1, 0], [1, 0, 0, 1], [0, 0, 0, 0]])


def test_positive_ids_from_mask():
  mask = np.array([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], np.float32)
  ids, dropped = positive_ids_from_mask(mask, 3)
  np.testing.assert_array_equal(ids, [[1, 3, 4], [-1, -1, -1], [0, -1, -1]])
  assert int(dropped) == 0
  ids, dropped = positive_ids_from_mask(mask, 2)
  np.testing.assert_array_equal(ids, [[1, 3], [-1, -1], [0, -1]])
  assert int(dropped) == 1
  ids, _ = positive_ids_from_mask(mask, 7)  # wider than M: padded
  assert ids.shape == (3, 7) and int((ids >= 0).sum()) == 4


# --- Ring loss == dense loss on 8 devices. -----------------------------------------------------


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


def _ring_fn(mesh, axis, *, owners, mask, extra_ids, weights=None):
  """f(zimg, ztxt, t, b) -> global loss, the batch split on ``axis``; None args left out."""
  spec = P(axis)
  opt = {"txt_owner_ids": owners, "positives": mask, "extra_pos_txt_ids": extra_ids,
         "pos_weight": weights}
  opt = {k: v for k, v in opt.items() if v is not None}

  def local(zi, zt, t, b, opt):
    return ring_sigmoid_loss(zi, zt, t, b, axis_name=axis, **opt)

  sm = jax.shard_map(local, mesh=mesh, out_specs=P(),
                     in_specs=(spec, spec, P(), P(), {k: spec for k in opt}))
  return jax.jit(lambda zi, zt, t, b: sm(zi, zt, t, b, opt))


CASES = {
    # name: (images, captions per image, owners permuted, dense mined mask, sparse mined ids,
    #        positives weighted K / |P_i|)
    "identity": (16, 1, False, False, False, False),
    "k_captions": (16, 3, True, False, False, False),
    "mined_dense_uneven": (16, 2, True, True, False, False),
    "mined_ids_uneven": (16, 1, False, False, True, False),
    "mined_dense_and_ids": (16, 2, True, True, True, False),
    "mined_dense_weighted": (16, 2, True, True, False, True),
    "mined_ids_weighted": (16, 1, False, False, True, True),
}


def _make_case(rng, n, k, permute, dense, sparse, weighted):
  m, d = n * k, 8
  zi, zt = _unit(rng, n, d), _unit(rng, m, d)
  owners = np.repeat(np.arange(n), k).astype(np.int32)
  if permute:
    owners = rng.permutation(owners)
  full = np.array(positives_from_owners(np.arange(n), owners))
  mask = extra_ids = None
  if dense:
    mask = np.maximum(full, _uneven_mask(rng, n, m))
    full = mask
  if sparse:
    extra = _uneven_mask(rng, n, m)
    extra_ids, dropped = positive_ids_from_mask(extra, 4)
    assert int(dropped) == 0
    full = np.maximum(full, extra)
  owners_arg = owners if (k > 1 or permute) else None
  weights = (k / full.sum(1)).astype(np.float32) if weighted else None
  return zi, zt, owners_arg, mask, extra_ids, full, weights


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("axes", [("data",), ("data", "fsdp")], ids=["data8", "data4xfsdp2"])
def test_ring_matches_dense(name, axes):
  assert jax.device_count() == 8
  mesh = _mesh((8,), axes) if len(axes) == 1 else _mesh((4, 2), axes)
  axis = axes[0] if len(axes) == 1 else axes
  rng = np.random.default_rng(sorted(CASES).index(name))
  zi, zt, owners, mask, extra_ids, full, w = _make_case(rng, *CASES[name])
  t, b = jnp.float32(10.0), jnp.float32(-4.0)

  ring = _ring_fn(mesh, axis, owners=owners, mask=mask, extra_ids=extra_ids, weights=w)
  dense = lambda a, c, t_, b_: sigmoid_loss(a, c, t_, b_, positives=jnp.asarray(full),
                                            pos_weight=None if w is None else jnp.asarray(w))
  got_l, got_g = jax.value_and_grad(ring, argnums=(0, 1, 2, 3))(zi, zt, t, b)
  want_l, want_g = jax.value_and_grad(dense, argnums=(0, 1, 2, 3))(zi, zt, t, b)
  np.testing.assert_allclose(got_l, want_l, **TOL)
  for got, want in zip(got_g, want_g, strict=True):
    np.testing.assert_allclose(got, want, **TOL)
  # And against the float64 loop reference, as an independent check of the dense one.
  ref = np_sigmoid_loss_and_grads(zi, zt, 10.0, -4.0, full, w)
  np.testing.assert_allclose(got_l, ref[0], **TOL)
  for got, want in zip(got_g, ref[1:], strict=True):
    np.testing.assert_allclose(got, want, **TOL)


def test_ring_never_gathers():
  """No all-gather, and no [n, M] (local images x global texts) array, in fwd + bwd."""
  mesh = _mesh((8,), ("data",))
  n_local, k = 4, 2
  rng = np.random.default_rng(5)
  zi, zt, owners, *_ = _make_case(rng, 8 * n_local, k, True, False, False, False)
  ring = _ring_fn(mesh, "data", owners=owners, mask=None, extra_ids=None)
  hlo = jax.jit(jax.value_and_grad(ring, argnums=(0, 1, 2, 3))).lower(
      zi, zt, jnp.float32(10.0), jnp.float32(-4.0)).compile().as_text()
  assert "all-gather" not in hlo
  assert "collective-permute" in hlo
  m_global = 8 * n_local * k
  assert f"[{n_local},{n_local * k}]" in hlo  # The per-step chunk is there ...
  assert f"[{n_local},{m_global}]" not in hlo and f"[{m_global},{n_local}]" not in hlo  # ... only.
