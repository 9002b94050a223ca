"""ResNet-12 (SCL's backbone) and SCL's projection heads: parameter counts against the
official architecture, shapes, a float64 numpy forward, DropBlock, logical names, config."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigvl.config import ConfigError, Reader
from bigvl.models import resnet12
from bigvl.models.resnet12 import (
  GlobalProjection,
  ResNet12,
  SpatialProjection,
  drop_block,
  drop_block_mask,
  dropblock_scale,
)


def _count(tree):
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(nn.meta.unbox(tree)))


def _abstract_init(model, shape):
  kw = {"train": False} if isinstance(model, ResNet12) else {}
  return jax.eval_shape(functools.partial(model.init, **kw), jax.random.key(0),
                        jnp.zeros(shape))


def _random_variables(model, shape, seed=0, scale=0.4):
  """Random float32 values in the shapes of ``model``'s variables (no jitted init: compiling
  the initialisers is most of the time of these tests); BN variances positive."""
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda a: rng.normal(scale=scale, size=a.shape).astype(np.float32),
                           nn.meta.unbox(_abstract_init(model, shape)))
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5,
                                            variables["batch_stats"])
  return variables


def official_resnet12_params(widths=(64, 160, 320, 640), in_ch=3, num_classes=64):
  """By hand from the official ``models/resnet.py``: per block three bias-free 3x3 convs, a
  bias-free 1x1 shortcut conv, four BatchNorms (weight + bias); a Linear(640, K) head."""
  total, cin = 0, in_ch
  for w in widths:
    total += 9 * cin * w + 9 * w * w + 9 * w * w  # conv1, conv2, conv3
    total += cin * w                              # 1x1 shortcut conv
    total += 4 * 2 * w                            # bn1, bn2, bn3, shortcut bn
    cin = w
  return total + cin * num_classes + num_classes


def test_param_count_matches_official_resnet12():
  variables = _abstract_init(ResNet12(num_classes=64), (1, 84, 84, 3))
  backbone = official_resnet12_params(num_classes=0)
  assert backbone == 12_424_320  # the "12.4M" of the few-shot literature
  assert official_resnet12_params() == 12_465_344
  assert _count(variables["params"]) == 12_465_344
  # running mean / var of the 16 BatchNorms are batch_stats, not parameters
  assert _count(variables["batch_stats"]) == 2 * 4 * sum((64, 160, 320, 640))
  out = jax.eval_shape(functools.partial(ResNet12(num_classes=64).apply, train=False),
                       variables, jnp.zeros((2, 84, 84, 3)))
  assert out["feature_map"].shape == (2, 5, 5, 640)  # 84 -> 42 -> 21 -> 10 -> 5
  assert out["features"].shape == (2, 640) and out["logits"].shape == (2, 64)


def test_32x32_with_last_pool_1_keeps_a_4x4_map():
  x = jnp.zeros((2, 32, 32, 3))
  model = ResNet12(num_classes=10, pool=(2, 2, 2, 1))
  variables = _abstract_init(model, x.shape)
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert out["feature_map"].shape == (2, 4, 4, 640)
  assert out["features"].shape == (2, 640) and out["logits"].shape == (2, 10)
  assert all(v.dtype == jnp.float32 for v in out.values())
  default = jax.eval_shape(functools.partial(ResNet12(num_classes=10).apply, train=False),
                           variables, x)
  assert default["feature_map"].shape == (2, 2, 2, 640)  # the official CIFAR-FS / FC100 map


def test_features_are_the_mean_of_the_map_and_no_classifier_with_zero_classes():
  model = ResNet12(num_classes=0, widths=(4, 8), pool=(2, 1))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  out = jax.jit(functools.partial(model.apply, train=False))(
      _random_variables(model, x.shape), x)
  assert set(out) == {"feature_map", "features"} and out["feature_map"].shape == (2, 4, 4, 8)
  np.testing.assert_allclose(out["features"], out["feature_map"].mean(axis=(1, 2)), rtol=1e-6)


# --- float64 numpy forward of the official block (eval mode) --------------------------------


def _np_conv_same(x, k):
  """x [B, H, W, Ci], k [kh, kw, Ci, Co], stride 1, zero 'same' padding (odd kernels)."""
  kh, kw = k.shape[:2]
  ph, pw = kh // 2, kw // 2
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  out = np.zeros(x.shape[:3] + (k.shape[3],))
  for i in range(kh):
    for j in range(kw):
      out += xp[:, i:i + x.shape[1], j:j + x.shape[2]] @ k[i, j]
  return out


def _np_bn(x, p, s, eps):
  return (x - s["mean"]) / np.sqrt(s["var"] + eps) * p["scale"] + p["bias"]


def _np_lrelu(x):
  return np.where(x >= 0, x, 0.1 * x)


def _np_maxpool(x, k):
  b, h, w, c = x.shape
  h2, w2 = h // k, w // k
  return x[:, :h2 * k, :w2 * k].reshape(b, h2, k, w2, k, c).max(axis=(2, 4))


def _np_resnet12(x, params, stats, widths, pool, eps):
  for i, k in enumerate(pool):
    p, s = params[f"block{i}"], stats[f"block{i}"]
    y = _np_lrelu(_np_bn(_np_conv_same(x, p["conv1"]["kernel"]), p["bn1"], s["bn1"], eps))
    y = _np_lrelu(_np_bn(_np_conv_same(y, p["conv2"]["kernel"]), p["bn2"], s["bn2"], eps))
    y = _np_bn(_np_conv_same(y, p["conv3"]["kernel"]), p["bn3"], s["bn3"], eps)
    if "shortcut" in p:
      x = _np_bn(_np_conv_same(x, p["shortcut"]["kernel"]), p["shortcut_bn"],
                 s["shortcut_bn"], eps)
    x = _np_lrelu(y + x)
    if k > 1:
      x = _np_maxpool(x, k)
  feats = x.mean(axis=(1, 2))
  return x, feats, feats @ params["head"]["kernel"] + params["head"]["bias"]


def test_forward_matches_numpy_reference():
  """Eval mode, random weights and BN statistics: the flax net equals a float64 loop version
  of the official block (activation after the residual sum; 1x1 conv + BN shortcut only
  where channels change or the block pools; max-pool dropping the ragged edge)."""
  widths, pool = (4, 6, 6), (2, 2, 1)
  model = ResNet12(num_classes=3, widths=widths, pool=pool)
  x = np.random.default_rng(0).normal(size=(2, 9, 9, 3)).astype(np.float32)
  rand = _random_variables(model, x.shape, seed=1)
  out = jax.jit(functools.partial(model.apply, train=False))(rand, x)
  assert "shortcut" not in rand["params"]["block2"]  # 6 -> 6 channels, no pooling
  ref = _np_resnet12(np.float64(x), *(jax.tree.map(np.float64, rand[k])
                                      for k in ("params", "batch_stats")),
                     widths, pool, model.bn_epsilon)
  for got, want in zip((out["feature_map"], out["features"], out["logits"]), ref,
                       strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert out["feature_map"].shape == (2, 2, 2, 6)  # 9 -> 4 -> 2 -> 2


def test_train_mode_batch_stats_and_drop_rng():
  """Training: dropout / DropBlock need a "dropout" rng (a different rng, different output;
  the same rng, the same), every BN's statistics move; eval is deterministic."""
  model = ResNet12(num_classes=5, widths=(4, 8, 8), pool=(2, 2, 1), dropblock_size=2)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = _random_variables(model, x.shape)
  train = jax.jit(lambda v, key, scale: model.apply(v, x, True, scale, mutable=["batch_stats"],
                                                    rngs={"dropout": key}))
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, train=True, mutable=["batch_stats"])
  a, upd = train(variables, jax.random.key(2), 1.0)
  b, _ = train(variables, jax.random.key(3), 1.0)
  a2, _ = train(variables, jax.random.key(2), 1.0)
  assert not np.allclose(a["logits"], b["logits"])
  np.testing.assert_array_equal(a["logits"], a2["logits"])
  assert all(np.any(np.asarray(u) != np.asarray(v)) for u, v in zip(
      jax.tree_util.tree_leaves(upd["batch_stats"]),
      jax.tree_util.tree_leaves(variables["batch_stats"]), strict=True))
  ev = jax.jit(functools.partial(model.apply, train=False))
  np.testing.assert_array_equal(ev(variables, x)["logits"], ev(variables, x)["logits"])


# --- DropBlock -------------------------------------------------------------------------------


def _np_official_block_mask(seeds, s):
  """The official ``_compute_block_mask`` (NCHW there): every seed at (i, j) of the
  ``[H - s + 1, W - s + 1]`` grid zeroes ``[i, i + s) x [j, j + s)`` of the ``[H, W]`` mask."""
  b, hs, ws, c = seeds.shape
  mask = np.ones((b, hs + s - 1, ws + s - 1, c))
  for n, i, j, ch in zip(*np.nonzero(seeds), strict=True):
    mask[n, i:i + s, j:j + s, ch] = 0.0
  return mask


@pytest.mark.parametrize("s,hw", [(5, 10), (5, 5), (2, 8), (3, 7)])
def test_drop_block_mask_matches_official(s, hw):
  rng = np.random.default_rng(s * hw)
  seeds = (rng.random((2, hw - s + 1, hw - s + 1, 3)) < 0.15).astype(np.float32)
  np.testing.assert_array_equal(drop_block_mask(jnp.asarray(seeds), s),
                                _np_official_block_mask(seeds, s))


def test_drop_block_rescales_and_drops_about_the_rate():
  x = jnp.ones((64, 10, 10, 16))
  y = np.asarray(drop_block(x, jax.random.key(0), 0.1, 5))
  dropped = y == 0
  kept = y[~dropped]
  np.testing.assert_allclose(kept, kept[0])  # one rescale factor for the whole batch
  np.testing.assert_allclose(kept[0], y.size / np.sum(~dropped), rtol=1e-6)
  # gamma = p / s^2 * H W / (H - s + 1)^2 gives ~p of the map dropped (blocks overlap a bit)
  assert 0.06 < dropped.mean() < 0.12
  np.testing.assert_array_equal(drop_block(x, jax.random.key(0), 0.0, 5), x)


def test_dropblock_schedule():
  np.testing.assert_allclose(dropblock_scale(0), 1 / 40_000)
  np.testing.assert_allclose(dropblock_scale(19_999), 0.5)
  np.testing.assert_allclose(dropblock_scale(10**6), 1.0)


# --- names, heads, config --------------------------------------------------------------------


def _names(boxed):
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def test_every_parameter_has_logical_names():
  names = _names(_abstract_init(ResNet12(num_classes=7, widths=(4, 8), pool=(2, 2)),
                                (1, 8, 8, 3))["params"])
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in names.values()), names
  names = {k: v.names for k, v in names.items()}
  assert names["block0/conv1/kernel"] == (None, None, "conv_in", "conv_out")
  assert names["block1/shortcut/kernel"] == (None, None, "conv_in", "conv_out")
  assert names["block0/bn3/scale"] == ("norm",)
  assert names["head/kernel"] == ("conv_out", "classes")
  assert names["head/bias"] == ("classes",)


def test_scl_heads_shapes_counts_and_names():
  fmap = jnp.zeros((3, 5, 5, 640))
  spatial = SpatialProjection()
  sp = jax.eval_shape(spatial.init, jax.random.key(0), fmap)["params"]
  assert _count(sp) == 3 * (640 * 640 + 640 * 80) == 1_382_400
  q, k, v = jax.eval_shape(spatial.apply, {"params": sp}, fmap)
  assert q.shape == k.shape == v.shape == (3, 25, 80)
  gl = GlobalProjection()
  gp = jax.eval_shape(gl.init, jax.random.key(0), jnp.zeros((3, 640)))["params"]
  assert _count(gp) == 640 * 640 + 640 * 80 == 460_800
  assert jax.eval_shape(gl.apply, {"params": gp}, jnp.zeros((3, 640))).shape == (3, 80)
  names = {k: v.names for k, v in _names(sp).items()}
  assert set(names) == {f"{h}/dense{i}/kernel" for h in ("query", "key", "value")
                        for i in (1, 2)}
  assert names["query/dense1/kernel"] == ("embed", "mlp")
  assert names["value/dense2/kernel"] == ("mlp", "proj")
  # per position: the same MLP as on a [P, C] matrix
  x = jax.random.normal(jax.random.key(1), (2, 3, 3, 8))
  small = SpatialProjection(out_dim=4)
  params = _random_variables(small, x.shape)
  q, _, v = jax.jit(small.apply)(params, x)
  p = params["params"]["value"]
  flat = np.asarray(x).reshape(2, 9, 8)
  np.testing.assert_allclose(v, np.maximum(flat @ p["dense1"]["kernel"], 0)
                             @ p["dense2"]["kernel"], rtol=1e-5, atol=1e-5)
  assert q.shape == (2, 9, 4)


def _cfg(**kw):
  return Reader(ml_collections.ConfigDict(kw), "config.model")


def test_from_config():
  m = resnet12.from_config(_cfg(widths=[8, 16, 16, 32], pool=(2, 2, 2, 1), drop_rate=0.0,
                                dropblock_size=2, bn_momentum=0.99, bn_epsilon=1e-3,
                                dtype="bfloat16"), 64)
  assert (m.widths, m.pool, m.drop_rate, m.dropblock_size) == ((8, 16, 16, 32), (2, 2, 2, 1),
                                                                0.0, 2)
  assert (m.bn_momentum, m.bn_epsilon, m.dtype, m.num_classes) == (0.99, 1e-3, jnp.bfloat16,
                                                                   64)
  d = resnet12.from_config(_cfg(), 5)
  assert (d.widths, d.pool, d.drop_rate, d.dropblock_size, d.bn_momentum, d.bn_epsilon,
          d.dtype) == ((64, 160, 320, 640), (2, 2, 2, 2), 0.1, 5, 0.9, 1e-5, jnp.float32)
  with pytest.raises(ConfigError, match="pool must have one stride per block"):
    resnet12.from_config(_cfg(pool=(2, 2)), 5)
  with pytest.raises(ConfigError, match="widths must be a non-empty tuple of positive ints"):
    resnet12.from_config(_cfg(widths=(64, 0, 1, 2)), 5)
  with pytest.raises(ConfigError, match="drop_rate must be in"):
    resnet12.from_config(_cfg(drop_rate=1.0), 5)


def test_from_config_defaults_are_the_fields(monkeypatch):
  monkeypatch.setattr(ResNet12, "widths", (3, 3))
  monkeypatch.setattr(ResNet12, "pool", (1, 1))
  monkeypatch.setattr(ResNet12, "dropblock_size", 3)
  m = resnet12.from_config(_cfg(), 5)
  assert (m.widths, m.pool, m.dropblock_size) == ((3, 3), (1, 1), 3)
