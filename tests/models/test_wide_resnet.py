"""WideResNet-28-2 (SSL variant): size, shapes, batch-norm behaviour, global-batch statistics."""

import flax.linen as nn
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


def _hlo_ops(model, variables, x, op):
  """The lines of the lowered (StableHLO) eval forward that are ``op``s."""
  text = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).as_text()
  return [ln for ln in text.splitlines() if f"stablehlo.{op}" in ln]


def test_bf16_compute_is_bf16():
  """dtype=bfloat16: parameters stay float32, every convolution and the classifier's dot run
  in bfloat16 (the lowered program says so), the logits come back float32 and close to, but
  not bitwise equal to, the float32 model's."""
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  model = WideResNet(depth=10, width=1, num_classes=3, dtype=jnp.bfloat16)
  f32 = WideResNet(depth=10, width=1, num_classes=3)
  variables = model.init(jax.random.key(0), x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables["params"]))
  convs = _hlo_ops(model, variables, x, "convolution")
  dots = _hlo_ops(model, variables, x, "dot_general")
  assert len(convs) == 1 + 3 * 2 + 2 and len(dots) == 1  # stem, 3 blocks, 2 shortcuts; head
  for ln in convs + dots:
    operands, result = ln.rsplit(":", 1)[1].split("->")
    assert operands.count("bf16>") == 2 and "bf16>" in result, ln
  assert not any("bf16" in ln for ln in _hlo_ops(f32, variables, x, "convolution"))

  out = model.apply(variables, x, train=False)
  ref = f32.apply(variables, x, train=False)
  assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 0  # really computed in bf16
  np.testing.assert_allclose(out, ref, rtol=0.05, atol=0.05 * float(np.abs(ref).max()))


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
  kernel = nn.meta.unbox(variables["params"]["stem"]["kernel"])
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
