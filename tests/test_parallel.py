"""The sharded train step equals the single-device step, and parameters are sharded as the
partition rules say."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bigvl import parallel, train
from bigvl.config import ConfigError
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
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "schedule.warmup_steps": 0}


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
  tree = {"w": jax.ShapeDtypeStruct((6, 16), np.float32)}
  with caplog.at_level("WARNING"):
    sh = parallel.tree_shardings(tree, [("w", ("fsdp", None))], mesh)
  assert sh["w"].spec == PartitionSpec(None, None)
  assert "not divisible" in caplog.text and "w" in caplog.text


def test_mesh_shape_fill_and_errors():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  with pytest.raises(ConfigError):
    parallel.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ConfigError):
    parallel.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
