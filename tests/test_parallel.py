"""The sharded train step equals the single-device step, and parameters are sharded as their
logical axis names and ``config.logical_axis_rules`` say."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bigvl import parallel, train
from bigvl.config import ConfigError
from bigvl.models import logical
from tests.helpers import tiny_config


def _one_step(config, devices):
  run = train.build(config, devices=devices)
  data = run.task.train_data(run.seed)
  local = next(data)
  batch = parallel.global_batch(local, run.mesh)
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  init_params = parallel.to_host(state["params"])
  new, aux = fns.step(state, batch)
  return run, init_params, new, aux


# SGD: Adam's first update is ~ lr * sign(g), which turns float-rounding noise in near-zero
# gradients into lr-sized differences; SGD keeps the comparison about the sharded math.
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "optim.b2": None, "schedule.warmup_steps": 0}


def test_sharded_step_equals_single_device(shapes_data_dir):
  assert jax.device_count() == 8
  one = tiny_config(shapes_data_dir, **{"mesh.data": 1, **SGD})
  _, p1_init, s1, a1 = _one_step(one, jax.devices()[:1])
  eight = tiny_config(shapes_data_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                          **SGD})
  run8, p8_init, s8, a8 = _one_step(eight, jax.devices())

  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p1_init, p8_init)
  np.testing.assert_allclose(float(a8["loss"]), float(a1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(a8["grad_norm"]), float(a1["grad_norm"]), rtol=1e-4)
  p1, p8 = parallel.to_host(s1["params"]), parallel.to_host(s8["params"])
  flat1 = dict(jax.tree_util.tree_leaves_with_path(p1))
  for path, leaf in jax.tree_util.tree_leaves_with_path(p8):
    np.testing.assert_allclose(leaf, flat1[path], rtol=1e-5, atol=1e-6,
                               err_msg=parallel.path_str(path))
  # The updated params really changed (the comparison is not between two copies of init).
  assert not np.allclose(p8["img"]["embedding"]["kernel"], p8_init["img"]["embedding"]["kernel"])

  fc1 = s8["params"]["img"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == PartitionSpec("fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape == (fc1.shape[0] // 2, fc1.shape[1] // 2)
  q = s8["params"]["txt"]["encoder"]["block0"]["attn"]["query"]["kernel"]
  assert q.sharding.spec == PartitionSpec("fsdp", "tensor", None)
  mu = s8["opt_state"][1].trace["img"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
  assert mu.sharding.spec == PartitionSpec("fsdp", "tensor")  # optimizer state follows


def test_indivisible_dim_is_replicated_with_warning(caplog):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  tree = {"params": {"w": jax.ShapeDtypeStruct((6, 16), np.float32)}}
  with caplog.at_level("WARNING"):
    sh = parallel.state_shardings(tree, {"params/w": ("embed", "kv")},
                                  parallel.DEFAULT_LOGICAL_RULES, mesh)
  assert sh["params"]["w"].spec == PartitionSpec(None, None)
  assert "not divisible" in caplog.text and "params/w" in caplog.text


class _Scanned(nn.Module):
  """Four MLP layers stacked by ``nn.scan``: kernels are ``[L, in, out]``."""

  @nn.compact
  def __call__(self, x):
    class Layer(nn.Module):
      @nn.compact
      def __call__(self, x, _):
        return logical.dense(x.shape[-1], ("embed", "mlp"), name="fc")(x), None

    stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=4,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    return stack(name="layers")(x, None)[0]


def test_scanned_layers_are_sharded_by_name_not_position():
  """A positional rule would shard ``[L, in, out]``'s L as if it were ``in``; logical names
  put fsdp on ``in`` and tensor on ``out`` whatever the stacking."""
  boxed = jax.eval_shape(_Scanned().init, jax.random.PRNGKey(0), jnp.ones((2, 8)))
  names = parallel.logical_names({"params": boxed["params"]})
  assert names["params/layers/fc/kernel"] == ("layers", "embed", "mlp")
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sh = parallel.state_shardings(parallel.unbox({"params": boxed["params"]}), names,
                                parallel.DEFAULT_LOGICAL_RULES, mesh)
  assert sh["params"]["layers"]["fc"]["kernel"].spec == PartitionSpec(None, "fsdp", "tensor")
  # Changing the parallelism is changing the table, not the model.
  rules = (("layers", "fsdp"), ("embed", "tensor"))
  sh = parallel.state_shardings(parallel.unbox({"params": boxed["params"]}), names, rules, mesh)
  assert sh["params"]["layers"]["fc"]["kernel"].spec == PartitionSpec("fsdp", "tensor", None)


def test_optimizer_state_inherits_its_parameter_sharding():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  w = jax.ShapeDtypeStruct((8, 4), np.float32)
  tree = {"params": {"a": {"w": w}}, "opt_state": ({"mu": {"a": {"w": w}}}, {"count": w}),
          "extra": {"teacher": {"a": {"w": w}}}}
  sh = parallel.state_shardings(tree, {"params/a/w": ("embed", "mlp")},
                                parallel.DEFAULT_LOGICAL_RULES, mesh)
  assert sh["opt_state"][0]["mu"]["a"]["w"].spec == PartitionSpec("fsdp", "tensor")
  assert sh["extra"]["teacher"]["a"]["w"].spec == PartitionSpec("fsdp", "tensor")
  assert sh["opt_state"][1]["count"].spec == PartitionSpec()  # no parameter path: replicated


def test_unnamed_and_large_replicated_parameters_are_reported(caplog):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  big = jax.ShapeDtypeStruct((2048, 1024), np.float32)  # 2M values
  tree = {"params": {"named": big, "plain": jax.ShapeDtypeStruct((4, 4), np.float32),
                     "bad_axes": big}}
  with caplog.at_level("WARNING"):
    parallel.state_shardings(tree, {"params/named": ("embed", "mlp"),
                                    "params/bad_axes": ("kv", "norm")},
                             parallel.DEFAULT_LOGICAL_RULES, mesh)
  assert "1 parameter(s) (16 values) have no logical axis names" in caplog.text
  assert "params/plain" in caplog.text
  assert "params/bad_axes (2,097,152 values) is replicated" in caplog.text
  assert "params/named" not in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):  # pure data parallelism replicates on purpose: no noise
    parallel.state_shardings(tree, {}, (), parallel.make_mesh({"data": 8}))
  assert caplog.text == ""


def test_bad_logical_rules_are_config_errors():
  with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
    parallel.check_logical_rules((("embed", "model"),))
  with pytest.raises(ConfigError, match="pairs"):
    parallel.check_logical_rules(("embed",))
  assert parallel.check_logical_rules(None) == parallel.check_logical_rules(
      parallel.DEFAULT_LOGICAL_RULES)


def test_mesh_shape_fill_and_errors():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ConfigError):
    parallel.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ConfigError):
    parallel.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def test_activation_constraint_leaves_names_without_a_rule_to_the_compiler(monkeypatch):
  """``logical.constrain``: a mapped name shards, a name mapped to nothing replicates, a name
  no rule mentions is UNCONSTRAINED (with no ``batch`` rule the towers' residual stream is
  the partitioner's choice, as before the constraint existed)."""
  seen = []
  monkeypatch.setattr(jax.lax, "with_sharding_constraint",
                      lambda x, sharding: seen.append(sharding.spec) or x)
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  x = jnp.ones((8, 3, 4))
  rules = parallel.check_logical_rules((("batch", ("data", "fsdp")), ("act_embed", None)))
  with parallel.activation_rules(rules, mesh):
    logical.constrain(x, "batch", "length", "act_embed")
  with parallel.activation_rules(parallel.check_logical_rules((("embed", "fsdp"),)), mesh):
    logical.constrain(x, "batch", "length", "act_embed")
  free = PartitionSpec.UNCONSTRAINED
  assert seen == [PartitionSpec(("data", "fsdp"), free, None), PartitionSpec(free, free, free)]
  assert logical.constrain(x, "batch", "length", "act_embed") is x  # no rules bound: as is
