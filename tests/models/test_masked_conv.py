"""Masked convolutions: orderings and masks, exact causality of the autoregressive network (by
gradients, every output pixel of every ordering), the unmasked inference convolution, and a
traced ordering under jit."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigvl.config import ConfigError, Reader
from bigvl.models import masked_conv as M

DN = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------------------------------------
# (a) Orderings and masks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("o", range(M.NUM_ORDERINGS))
def test_pixel_rank_is_a_permutation_and_transform_is_a_symmetry(o):
  t = M.ordering_transform(o)
  assert abs(round(np.linalg.det(t))) == 1 and np.abs(t).sum() == 2
  for h, w in [(5, 7), (4, 4), (1, 3)]:
    rank = M.pixel_rank(o, h, w)
    assert rank.shape == (h, w)
    np.testing.assert_array_equal(np.sort(rank.ravel()), np.arange(h * w))


def test_orderings_are_the_rotations_and_transposes_of_the_raster_scan():
  np.testing.assert_array_equal(M.pixel_rank(0, 3, 4), np.arange(12).reshape(3, 4))
  n = 5
  raster = np.arange(n * n).reshape(n, n)
  dihedral = {np.rot90(a, k).tobytes() for a in (raster, raster.T) for k in range(4)}
  ranks = {M.pixel_rank(o, n, n).tobytes() for o in range(M.NUM_ORDERINGS)}
  assert ranks == dihedral and len(ranks) == 8


@pytest.mark.parametrize("o", range(M.NUM_ORDERINGS))
@pytest.mark.parametrize("kernel_size", [3, 5, (3, 5)])
def test_causal_mask_keeps_exactly_the_earlier_offsets(o, kernel_size):
  kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
  # On a kh x kw grid, the neighbours of the centre that come before it in ordering o are
  # exactly the taps the mask keeps (the order is translation invariant).
  rank = M.pixel_rank(o, kh, kw)
  earlier = (rank < rank[kh // 2, kw // 2]).astype(np.float32)
  mask_a = M.causal_mask(kernel_size, o, include_center=False)
  mask_b = M.causal_mask(kernel_size, o, include_center=True)
  assert mask_a.shape == (kh, kw) and mask_a.dtype == np.float32
  np.testing.assert_array_equal(mask_a, earlier)
  assert mask_a.sum() == (kh * kw - 1) // 2
  centre = np.zeros((kh, kw), np.float32)
  centre[kh // 2, kw // 2] = 1
  np.testing.assert_array_equal(mask_b, mask_a + centre)
  # d and -d on opposite sides: the mask and its 180-degree rotation tile the off-centre taps.
  np.testing.assert_array_equal(mask_a + mask_a[::-1, ::-1] + centre, np.ones((kh, kw)))


def test_masks_of_ordering_0_and_distinctness():
  np.testing.assert_array_equal(M.causal_mask(3, 0, False), [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(M.causal_mask(3, 0, True), [[1, 1, 1], [1, 1, 0], [0, 0, 0]])
  masks = M.causal_masks(3, include_center=False)
  assert masks.shape == (8, 3, 3)
  assert len({m.tobytes() for m in masks}) == 8
  # Every off-centre tap is kept by exactly 4 of the 8 orderings (so all of them are trained).
  np.testing.assert_array_equal(masks.sum(0), [[4, 4, 4], [4, 0, 4], [4, 4, 4]])


def test_bad_arguments():
  for bad in (-1, 8, 1.0, True):
    with pytest.raises(ValueError, match="ordering"):
      M.ordering_transform(bad)
  with pytest.raises(ValueError, match="odd"):
    M.causal_mask(4, 0, True)


# ---------------------------------------------------------------------------------------------
# (b) Causality of the whole network, by gradients.
# ---------------------------------------------------------------------------------------------


def _small_net(**kw):
  kw = {"num_clusters": 3, "width": 6, "dilations": (1, 2, 1, 2), "feature_dim": 3, **kw}
  return M.AutoregressiveNet(**kw)


def _trained_stats_variables(net, x):
  """Variables with every parameter random (none zero: the mask-A centre tap is initialised to
  zero, and a leak through it must show) and non-trivial running statistics (one train-mode
  pass), so eval-mode BatchNorm is a real per-channel affine map."""
  variables = nn.unbox(net.init(jax.random.key(1), x, 0, train=False))
  leaves, tree = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.key(2), len(leaves))
  leaves = [0.5 * jax.random.normal(k, v.shape) + (v if v.ndim > 1 else 1.0)
            for k, v in zip(keys, leaves, strict=True)]
  variables = {**variables, "params": jax.tree_util.tree_unflatten(tree, leaves)}
  _, upd = net.apply(variables, x * 3.0 + 1.0, 0, train=True, mutable=["batch_stats"])
  return {**variables, **upd}


def _dependency(net, variables, x):
  """jit(o -> [H, W (outputs), H, W (inputs)]): sum of |d out / d in| over channels."""

  def outputs(img, o):
    out = net.apply(variables, img[None], o, train=False)
    return jnp.concatenate([out["clusters"], out["features"]], axis=-1)[0]

  @jax.jit
  def dep(o):
    jac = jax.jacrev(outputs)(x[0], o)  # [H, W, K + D, H, W, C]
    return jnp.sum(jnp.abs(jac), axis=(2, 5))

  return dep


def test_network_is_exactly_causal_for_every_ordering_and_pixel():
  h, w = 9, 8
  x = jax.random.normal(jax.random.key(0), (1, h, w, 2))
  net = _small_net()
  variables = _trained_stats_variables(net, x)
  dep = _dependency(net, variables, x)
  total_earlier = 0
  for o in range(M.NUM_ORDERINGS):
    d = np.asarray(dep(jnp.int32(o)))
    rank = M.pixel_rank(o, h, w)
    for py in range(h):
      for px in range(w):
        later = rank >= rank[py, px]
        assert np.all(d[py, px][later] == 0), (o, py, px)
        if rank[py, px] > 0:
          assert np.any(d[py, px][~later] > 0), (o, py, px)
          total_earlier += 1
        else:
          assert np.all(d[py, px] == 0)  # the first pixel sees no input
    # Exactly the stack's receptive field: a subset of it, and most of it (a few paths die
    # at ReLUs).
    reach = _receptive_fields(o, net, h, w)
    assert np.all(reach <= (rank[:, :, None, None] > rank[None, None]))
    assert np.all((d > 0) <= reach)
    assert (d > 0).sum() >= 0.9 * reach.sum(), ((d > 0).sum(), reach.sum())
  assert total_earlier > 0


def _shift(a, dy, dx):
  """``out[..., y, x] = a[..., y + dy, x + dx]``, zero outside."""
  h, w = a.shape[-2:]
  out = np.zeros_like(a)
  out[..., max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = (
      a[..., max(0, dy):min(h, h + dy), max(0, dx):min(w, w + dx)])
  return out


def _receptive_fields(o, net, h, w):
  """[H, W (outputs), H, W (inputs)] bool: input q is reachable from output p through the
  masked taps of every layer with all intermediate pixels inside the image."""
  reach = np.zeros((h, w, h, w), bool)
  for py in range(h):
    for px in range(w):
      reach[py, px, py, px] = True
  for i in reversed(range(len(net.dilations))):
    mask = M.causal_mask(net.kernel_size, o, include_center=i > 0)
    c, dil = net.kernel_size // 2, net.dilations[i]
    new = np.zeros_like(reach)
    for ky, kx in zip(*np.nonzero(mask), strict=True):
      # r reachable and r + dil d in bounds -> r + dil d reachable.
      new |= _shift(reach, -(ky - c) * dil, -(kx - c) * dil)
    reach = new
  return reach


def test_unmasked_network_is_not_causal():
  x = jax.random.normal(jax.random.key(0), (1, 6, 6, 2))
  net = _small_net(dilations=(1, 1))
  variables = _trained_stats_variables(net, x)

  def outputs(img):
    return net.apply(variables, img[None], None, train=False)["clusters"][0]

  jac = np.asarray(jnp.sum(jnp.abs(jax.jacrev(outputs)(x[0])), axis=(2, 5)))
  assert jac[3, 3, 3, 3] > 0 and jac[3, 3, 4, 4] > 0  # itself and a later pixel


# ---------------------------------------------------------------------------------------------
# (c) The inference convolution; the masked one against a numpy loop.
# ---------------------------------------------------------------------------------------------


def _np_conv(x, kernel, dilation):
  """SAME, stride 1, cross-correlation with zero padding; explicit loop over taps."""
  b, h, w, _ = x.shape
  kh, kw = kernel.shape[:2]
  out = np.zeros((b, h, w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      dy, dx = (i - kh // 2) * dilation, (j - kw // 2) * dilation
      shifted = np.zeros_like(x)
      ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
      yt, xt = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
      shifted[:, ys, xs] = x[:, yt, xt]  # shifted[p] = x[p + d]
      out += shifted @ kernel[i, j]
  return out


@pytest.mark.parametrize("include_center", [False, True])
def test_ordering_none_is_the_plain_convolution(include_center):
  conv = M.MaskedConv(5, kernel_size=3, dilation=2, include_center=include_center)
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  params = nn.unbox(conv.init(jax.random.key(1), x, None))["params"]
  kernel = params["kernel"]
  assert kernel.shape == (3, 3, 3, 5)
  # Mask A: the centre tap (masked in every ordering) starts at zero; mask B: it does not.
  assert np.all(np.asarray(kernel[1, 1]) == 0) != include_center
  kernel = kernel.at[1, 1].set(jax.random.normal(jax.random.key(3), (3, 5)))
  params = {"kernel": kernel, "bias": jax.random.normal(jax.random.key(2), (5,))}
  got = conv.apply({"params": params}, x, None)
  want = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", rhs_dilation=(2, 2),
                                      dimension_numbers=DN) + params["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  xs, ks = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  bias = np.asarray(params["bias"], np.float64)
  np.testing.assert_allclose(got, _np_conv(xs, ks, 2) + bias, rtol=1e-4, atol=1e-4)
  for o in (0, 5):
    mask = M.causal_mask(3, o, include_center)[:, :, None, None]
    np.testing.assert_allclose(conv.apply({"params": params}, x, o),
                               _np_conv(xs, ks * mask, 2) + bias, rtol=1e-4, atol=1e-4)


def test_kernel_logical_names():
  net = _small_net()
  x = jnp.zeros((1, 6, 6, 2))
  init = functools.partial(net.init, train=False)
  boxed = jax.eval_shape(init, jax.random.key(0), x, 0)["params"]
  names = {"/".join(k.key for k in path): leaf.names for path, leaf in
           jax.tree_util.tree_flatten_with_path(
               boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))[0]}
  assert names["conv0/kernel"] == (None, None, "conv_in", "conv_out")
  assert names["bn1/scale"] == ("norm",)
  assert names["clusters/kernel"] == ("conv_out", "classes")
  assert names["features/kernel"] == ("conv_out", "proj")
  conv = M.MaskedConv(4)
  boxed = jax.eval_shape(conv.init, jax.random.key(0), x, None)["params"]
  assert boxed["bias"].names == ("conv_out",)


# ---------------------------------------------------------------------------------------------
# (d) A traced ordering under jit: one compilation, the static results.
# ---------------------------------------------------------------------------------------------


def test_traced_ordering_matches_static_and_compiles_once():
  x = jax.random.normal(jax.random.key(0), (2, 6, 5, 2))
  net = _small_net()
  variables = _trained_stats_variables(net, x)
  traces = []

  @jax.jit
  def run(o):
    traces.append(1)
    return net.apply(variables, x, o, train=False)

  for o in range(M.NUM_ORDERINGS):
    got, want = run(jnp.int32(o)), net.apply(variables, x, o, train=False)
    for key in ("clusters", "features"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=2e-5)
  assert len(traces) == 1
  differ = net.apply(variables, x, 1, train=False)["clusters"]
  assert np.abs(np.asarray(differ) - np.asarray(run(jnp.int32(0))["clusters"])).max() > 1e-3


def test_shapes_train_mode_and_feature_norms():
  x = jax.random.normal(jax.random.key(0), (2, 6, 7, 3))
  net = _small_net(dtype=jnp.bfloat16)
  variables = net.init(jax.random.key(1), x, 0, train=False)
  out, upd = net.apply(variables, x, jnp.int32(4), train=True, mutable=["batch_stats"])
  assert out["clusters"].shape == (2, 6, 7, 3) and out["clusters"].dtype == jnp.float32
  assert out["features"].shape == (2, 6, 7, 3) and out["features"].dtype == jnp.float32
  np.testing.assert_allclose(jnp.linalg.norm(out["features"], axis=-1), 1.0, rtol=1e-5)
  changed = [np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(upd["batch_stats"]),
      jax.tree_util.tree_leaves(variables["batch_stats"]), strict=True)]
  assert all(changed)


def _model_cfg(**kw) -> Reader:
  return Reader(ml_collections.ConfigDict(kw), "config.model")


def test_from_config():
  net = M.from_config(_model_cfg(), 7)
  assert net.num_clusters == 7 and net.dilations == M.AutoregressiveNet.dilations
  net = M.from_config(_model_cfg(width=8, dilations=(1, 2), feature_dim=4, residual=False,
                                 dtype="bfloat16"), 3)
  assert (net.width, net.dilations, net.feature_dim, net.residual, net.dtype) == (
      8, (1, 2), 4, False, jnp.bfloat16)
  for bad in ((), (1, 0), (1, 2.0)):
    with pytest.raises(ConfigError, match="dilations"):
      M.from_config(_model_cfg(dilations=bad), 3)
  with pytest.raises(ConfigError, match="odd"):
    M.from_config(_model_cfg(kernel_size=4), 3)
