"""Pretrained init: ``config.init_from`` (a previous bigvl run or a safetensors file) fills
part of the state after a fresh init, straight into the shards its logical axes give, and
never on resume; a missing key or a shape mismatch is a config error."""

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from bigvl import checkpoint, parallel, train
from bigvl.config import ConfigError
from tests.helpers import tiny_config

MESH8 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def _init(config, devices=None):
  run = train.build(config, devices=devices)
  batch = parallel.global_batch(next(run.task.train_data(run.seed)), run.mesh)
  fns = train.compile_run(run, batch)
  return run, fns, fns.init(batch)


def _flat(tree):
  return {parallel.path_str(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(parallel.to_host(tree))}


@pytest.fixture(scope="module")
def source_run(shapes_data_dir, tmp_path_factory):
  """A bigvl checkpoint of a seed-1 model (its text tower frozen, so its params are split
  over ``params`` and ``frozen`` as a real LoRA-style run's would be)."""
  c = tiny_config(shapes_data_dir, seed=1, **{"mesh.data": 1})
  c.evals = {}
  c.optim.frozen = ("^txt/",)
  _, _, state = _init(c, jax.devices()[:1])
  path = tmp_path_factory.mktemp("src")
  ckpt = checkpoint.Checkpointer(str(path))
  ckpt.save(5, state, {})
  ckpt.close()
  return str(path), _flat(train.model_params(state))


def test_init_from_a_previous_run_fills_only_its_dst(shapes_data_dir, source_run):
  path, src = source_run
  fresh = _flat(train.model_params(_init(tiny_config(shapes_data_dir, **MESH8))[2]))
  c = tiny_config(shapes_data_dir, **MESH8)
  c.init_from = {"img": {"path": path, "dst": "params/img"}}
  run, fns, state = _init(c)
  got = _flat(train.model_params(state))
  assert got.keys() == fresh.keys()
  for name, value in got.items():
    want = src[name] if name.startswith("img/") else fresh[name]
    np.testing.assert_array_equal(value, want, err_msg=name)
  assert not np.array_equal(src["txt/token_embedding/embedding"],
                            fresh["txt/token_embedding/embedding"])  # the seeds differ
  fc1 = state["params"]["img"]["encoder"]["block0"]["mlp"]["fc1"]["kernel"]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape == (fc1.shape[0] // 2, fc1.shape[1] // 2)


def test_init_from_reads_frozen_leaves_of_the_source_into_trainable_ones(shapes_data_dir,
                                                                         source_run):
  path, src = source_run  # its txt/ leaves live under 'frozen' in the file
  c = tiny_config(shapes_data_dir, **{"mesh.data": 1})
  c.init_from = {"all": {"path": path}}
  _, _, state = _init(c, jax.devices()[:1])
  got = _flat(state["params"])
  assert any(k.startswith("txt/") for k in got)
  for name, value in got.items():
    np.testing.assert_array_equal(value, src[name], err_msg=name)


def test_init_from_safetensors_lands_in_the_right_shards(shapes_data_dir, source_run, tmp_path):
  _, src = source_run
  tensors = {"tower." + k[len("txt/"):].replace("/", "."): v for k, v in src.items()
             if k.startswith("txt/")}
  save_file(tensors, str(tmp_path / "txt.safetensors"))
  c = tiny_config(shapes_data_dir, **MESH8)
  c.init_from = {"txt": {"path": str(tmp_path / "txt.safetensors"), "dst": "params/txt",
                         "src": "tower"}}
  _, fns, state = _init(c)
  got = _flat(state["params"]["txt"])
  assert len(got) == len(tensors)
  for name, value in got.items():
    np.testing.assert_array_equal(value, src["txt/" + name], err_msg=name)
  emb = state["params"]["txt"]["token_embedding"]["embedding"]
  # the config's rules: the token table's rows (vocab) over ('tensor', 'fsdp')
  assert emb.sharding.spec == jax.sharding.PartitionSpec(("tensor", "fsdp"), None)
  assert emb.sharding == fns.state_shardings["params"]["txt"]["token_embedding"]["embedding"]
  np.testing.assert_array_equal(emb.addressable_shards[0].data,
                                src["txt/token_embedding/embedding"][
                                    emb.addressable_shards[0].index])


def test_missing_key_and_wrong_shape_are_config_errors(shapes_data_dir, source_run, tmp_path):
  _, src = source_run
  tensors = {k.replace("/", "."): v for k, v in src.items() if k.startswith("txt/")}
  tensors.pop("txt.encoder.block0.mlp.fc1.bias")
  tensors["txt.encoder.block0.mlp.fc2.bias"] = np.zeros(3, np.float32)
  save_file(tensors, str(tmp_path / "bad.safetensors"))
  c = tiny_config(shapes_data_dir, **{"mesh.data": 1})
  c.init_from = {"t": {"path": str(tmp_path / "bad.safetensors"), "dst": "params/txt",
                       "src": "txt"}}
  with pytest.raises(ConfigError, match=r"config.init_from.t.path: .* has no "
                                        r"'txt.encoder.block0.mlp.fc1.bias'.*closest"):
    _init(c, jax.devices()[:1])
  del tensors["txt.encoder.block0.mlp.fc2.bias"]
  tensors["txt.encoder.block0.mlp.fc1.bias"] = src["txt/encoder/block0/mlp/fc1/bias"]
  tensors["txt.encoder.block0.mlp.fc2.bias"] = np.zeros(3, np.float32)
  save_file(tensors, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ConfigError, match=r"is \(3,\) in .* but params/txt/encoder/block0/mlp/"
                                        r"fc2/bias is \(32,\) in this model"):
    _init(c, jax.devices()[:1])
  c.init_from = {"t": {"path": "/nonexistent/run"}}
  with pytest.raises(ConfigError, match="holds no bigvl checkpoint"):
    _init(c, jax.devices()[:1])
  c.init_from = {"t": {"path": str(tmp_path / "bad.safetensors"), "dst": "params/nope"}}
  with pytest.raises(ConfigError, match="names no part of this run's state"):
    _init(c, jax.devices()[:1])


@pytest.mark.slow
def test_init_from_is_not_read_on_resume(shapes_data_dir, source_run, tmp_path):
  """A resumed run takes everything from its own checkpoint: the source may be gone."""
  import shutil

  path, src = source_run
  copy = str(tmp_path / "src")
  shutil.copytree(path, copy)
  c = tiny_config(shapes_data_dir, total_steps=2, ckpt_every=2)
  c.evals = {}
  c.init_from = {"img": {"path": copy, "dst": "params/img"}}
  train.train(c, str(tmp_path / "w"))
  shutil.rmtree(copy)
  c.total_steps = 3
  train.train(c, str(tmp_path / "w"))  # would raise ConfigError if it read the source
  steps = checkpoint.Checkpointer(str(tmp_path / "w")).all_steps()
  assert steps[-1] == 3
