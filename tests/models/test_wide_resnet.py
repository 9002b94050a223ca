"""WideResNet-28-2 (SSL variant): size, shapes, batch-norm behaviour, global-batch statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bigvl.models.wide_resnet import WideResNet


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def test_wrn_28_2_param_count():
  """1,467,610: the WRN-28-2 of Oliver et al. 2018 / MixMatch / FixMatch ("1.5M")."""
  model = WideResNet(depth=28, width=2, num_classes=10)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                                train=False))
  assert _count(variables["params"]) == 1_467_610
  # Running mean + var of every BN layer (25 of them, 16..128 channels).
  assert _count(variables["batch_stats"]) == 2 * (16 + 32 * 8 + 64 * 8 + 128 * 8)


@pytest.mark.parametrize("shape", [(3, 28, 28, 1), (3, 8, 8, 1), (3, 32, 32, 3)])
def test_output_shapes(shape):
  model = WideResNet(num_classes=7)
  x = jnp.zeros(shape)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert out.shape == (3, 7) and out.dtype == jnp.float32
  out, upd = jax.eval_shape(
      lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
  assert out.shape == (3, 7)
  assert jax.tree_util.tree_structure(upd["batch_stats"]) == jax.tree_util.tree_structure(
      variables["batch_stats"])


def test_bf16_compute_runs():
  model = WideResNet(depth=10, width=1, num_classes=3, dtype=jnp.bfloat16)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  assert jax.tree_util.tree_leaves(variables["params"])[0].dtype == jnp.float32
  out = model.apply(variables, x, train=False)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))


def test_batch_norm_train_updates_eval_does_not():
  model = WideResNet(depth=28, width=2, num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1)) * 3.0 + 1.0
  variables = model.init(jax.random.key(0), x, train=False)
  stats0 = variables["batch_stats"]
  np.testing.assert_array_equal(stats0["group0_block0"]["bn1"]["mean"], 0.0)
  np.testing.assert_array_equal(stats0["group0_block0"]["bn1"]["var"], 1.0)

  train_apply = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  _, upd = train_apply(variables, x)
  bn1 = upd["batch_stats"]["group0_block0"]["bn1"]
  assert float(jnp.abs(bn1["mean"]).max()) > 0.0
  assert float(jnp.abs(bn1["var"] - 1.0).max()) > 0.0
  for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]),
                  jax.tree_util.tree_leaves(stats0), strict=True):
    assert np.any(np.asarray(a) != np.asarray(b))

  # Eval mode: no mutable collection asked for -> nothing can change; asking for it returns the
  # same statistics, and the output does not depend on the other batch members.
  _, upd_eval = model.apply(variables, x, train=False, mutable=["batch_stats"])
  for a, b in zip(jax.tree_util.tree_leaves(upd_eval["batch_stats"]),
                  jax.tree_util.tree_leaves(stats0), strict=True):
    np.testing.assert_array_equal(a, b)
  full = model.apply(variables, x, train=False)
  single = model.apply(variables, x[:1], train=False)
  np.testing.assert_allclose(full[:1], single, rtol=1e-4, atol=1e-5)


def test_running_mean_matches_momentum_formula():
  """Stem output -> bn1: new_mean = 0.999 * 0 + 0.001 * batch_mean(stem(x))."""
  model = WideResNet(depth=10, width=1, num_classes=2)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1)) + 2.0
  variables = model.init(jax.random.key(0), x, train=False)
  _, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  kernel = variables["params"]["stem"]["kernel"]
  stem = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = 0.001 * jnp.mean(stem, axis=(0, 1, 2))
  np.testing.assert_allclose(upd["batch_stats"]["group0_block0"]["bn1"]["mean"], want,
                             rtol=1e-4, atol=1e-6)


def test_sharded_global_batch_statistics_equal_unsharded():
  """Under jit with a batch sharded over 8 devices, BN uses global-batch statistics."""
  assert jax.device_count() >= 8
  model = WideResNet(depth=10, width=1, num_classes=3)
  x = jax.random.normal(jax.random.key(3), (16, 8, 8, 1)) * 2.0 + jnp.arange(16.0)[:, None,
                                                                                  None, None]
  variables = model.init(jax.random.key(0), x, train=False)
  step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  out_ref, upd_ref = step(variables, x)

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  vs = jax.device_put(variables, NamedSharding(mesh, P()))
  out, upd = step(vs, xs)
  assert len(xs.sharding.device_set) == 8
  np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(upd["batch_stats"]),
                  jax.tree_util.tree_leaves(upd_ref["batch_stats"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # And they differ from per-shard (local) statistics: shard 0 alone gives other stats.
  _, upd_local = step(variables, x[:2])
  a = upd_local["batch_stats"]["group0_block0"]["bn1"]["mean"]
  b = upd_ref["batch_stats"]["group0_block0"]["bn1"]["mean"]
  assert not np.allclose(a, b)


def test_bad_depth():
  with pytest.raises(ValueError):
    WideResNet(depth=27).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)
