"""Llama/Qwen2 checkpoints: imported logits equal transformers' own, export loads back into
transformers (LoRA merged), sharded directories, clear errors, and the train loop's
pretrained-init hook reading straight into shards over an 8-device mesh."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from bigvl import checkpoint, convert  # noqa: E402
from bigvl.config import ConfigError  # noqa: E402
from bigvl.convert import llama, rules  # noqa: E402
from bigvl.models.llm import LLM  # noqa: E402
from bigvl.models.lora import LoraConfig  # noqa: E402

TOL = 1e-4


def _hf_logits(model, ids, mask=None, positions=None):
  kw = {}
  if mask is not None:
    kw["attention_mask"] = torch.tensor(mask, dtype=torch.long)
  if positions is not None:
    kw["position_ids"] = torch.tensor(positions, dtype=torch.long)
  with torch.no_grad():
    return model(torch.tensor(ids), **kw).logits.float().numpy()


def _ids(shape, seed=0):
  return np.random.RandomState(seed).randint(0, 128, shape).astype(np.int32)


def _flat(tree, prefix=""):
  if not hasattr(tree, "items"):
    return {prefix: np.asarray(tree)}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}/{k}" if prefix else k))
  return out


@pytest.fixture(scope="module")
def loaded(hf_llama, hf_qwen2):
  """``{directory: (model, params)}`` imported once."""
  return {d: convert.load_hf_checkpoint(d) for d, _ in (hf_llama, hf_qwen2)}


# --- (a) import ------------------------------------------------------------------------------

def test_config_from_hf(hf_llama, hf_qwen2):
  c = llama.config_from_hf(json.load(open(os.path.join(hf_llama[0], "config.json"))))
  assert (c.width, c.depth, c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim) == (
      64, 2, 4, 2, 16, 96)
  assert c.rope_theta == 50000.0 and c.norm_eps == 1e-5
  assert not c.qkv_bias and not c.tie_embeddings
  q = llama.config_from_hf(json.load(open(os.path.join(hf_qwen2[0], "config.json"))))
  assert q.qkv_bias and q.tie_embeddings
  # transformers-4 style: top-level rope_theta, no head_dim, rope_scaling null
  old = {"model_type": "llama", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 4, "rope_theta": 5e5,
         "rope_scaling": None}
  c = llama.config_from_hf(old)
  assert c.head_dim == 8 and c.num_kv_heads == 4 and c.rope_theta == 5e5
  assert llama.config_from_hf(llama.config_to_hf(c)) == c


def test_logits_match_transformers(hf_model, loaded):
  directory, hf = hf_model
  model, params = loaded[directory]
  ids = _ids((2, 11))
  got = np.asarray(model.apply({"params": params}, ids))
  want = _hf_logits(hf, ids)
  assert got.shape == want.shape == (2, 11, 128)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_left_padding_and_explicit_positions_match_transformers(hf_model, loaded):
  directory, hf = hf_model
  model, params = loaded[directory]
  ids = _ids((3, 10), seed=1)
  lengths = np.array([10, 7, 4])
  mask = (np.arange(10)[None] >= 10 - lengths[:, None]).astype(np.int32)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + np.array([[0], [3], [5]])
  got = np.asarray(model.apply({"params": params}, ids, positions=positions,
                               attention_mask=mask.astype(bool)))
  want = _hf_logits(hf, ids, mask, positions)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], atol=TOL, rtol=0)
  # the last prompt alone, unpadded, at its own positions: the same logits
  alone = np.asarray(model.apply({"params": params}, ids[2:, 6:], positions=positions[2:, 6:]))
  np.testing.assert_allclose(alone[0], got[2, 6:], atol=TOL, rtol=0)


def test_bfloat16_checkpoint_loads_as_float32(hf_qwen2, tmp_path):
  import copy

  hf = copy.deepcopy(hf_qwen2[1])  # the session's model stays float32
  hf.to(torch.bfloat16).save_pretrained(str(tmp_path), safe_serialization=True)
  _, params = convert.load_hf_checkpoint(str(tmp_path))
  emb = params["embed"]["embedding"]
  assert emb.dtype == np.float32
  want = hf.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy()
  np.testing.assert_array_equal(emb, want)


# --- (b) export ------------------------------------------------------------------------------

def test_export_loads_in_transformers(hf_model, loaded, tmp_path):
  directory, hf = hf_model
  model, params = loaded[directory]
  out = str(tmp_path / "export")
  convert.save_hf_checkpoint(out, model, params)
  assert json.load(open(os.path.join(out, "config.json")))["model_type"] == \
      json.load(open(os.path.join(directory, "config.json")))["model_type"]
  original, exported = load_file(os.path.join(directory, "model.safetensors")), \
      load_file(os.path.join(out, "model.safetensors"))
  assert exported.keys() == original.keys()
  for k, v in original.items():
    np.testing.assert_array_equal(exported[k], v, err_msg=k)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = _ids((2, 9), seed=2)
  np.testing.assert_allclose(_hf_logits(back, ids), _hf_logits(hf, ids), atol=TOL, rtol=0)


def test_export_merges_lora(hf_llama, loaded, tmp_path):
  model, params = loaded[hf_llama[0]]
  lora = LoraConfig(rank=4, alpha=8.0, targets=r"(attn/(q|k|v|o)|mlp/(gate|up|down))$")
  adapted = LLM(llama.dataclasses.replace(model.config, lora=lora))
  ids = _ids((2, 9), seed=3)
  init = jax.device_get(nn.meta.unbox(adapted.init(jax.random.PRNGKey(0), ids))["params"])
  flat = _flat(init)
  rng = np.random.RandomState(0)
  for path in flat:
    if path.endswith("lora_b"):
      flat[path] = 0.05 * rng.randn(*flat[path].shape).astype(np.float32)
  base = _flat(params)
  flat.update(base)
  assert {p for p in flat if p.endswith("lora_b")} and set(base) < set(flat)
  tree = rules.nest(flat)
  want = np.asarray(adapted.apply({"params": tree}, ids))
  assert np.abs(want - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2
  out = str(tmp_path / "lora")
  convert.save_hf_checkpoint(out, adapted, tree)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  np.testing.assert_allclose(_hf_logits(back, ids), want, atol=TOL, rtol=0)


def test_llama_without_biases_exports_as_qwen2_with_zero_biases(hf_llama, loaded, tmp_path):
  model, params = loaded[hf_llama[0]]
  out = str(tmp_path / "q")
  convert.save_hf_checkpoint(out, model, params, model_type="qwen2")
  m2, p2 = convert.load_hf_checkpoint(out)
  assert m2.config.qkv_bias
  ids = _ids((1, 7))
  np.testing.assert_allclose(m2.apply({"params": p2}, ids), model.apply({"params": params}, ids),
                             atol=1e-6, rtol=0)


# --- (c) sharded directories -----------------------------------------------------------------

def test_sharded_checkpoint_loads_identically(hf_model, loaded, tmp_path):
  directory, hf = hf_model
  _, params = loaded[directory]
  hf.save_pretrained(str(tmp_path / "hf"), safe_serialization=True, max_shard_size="40KB")
  shards = [f for f in os.listdir(tmp_path / "hf") if f.endswith(".safetensors")]
  assert len(shards) > 2 and os.path.isfile(tmp_path / "hf" / "model.safetensors.index.json")
  _, got = convert.load_hf_checkpoint(str(tmp_path / "hf"))
  want = _flat(params)
  assert _flat(got).keys() == want.keys()
  for k, v in _flat(got).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  # our own sharded export, read back by transformers and by us
  model = loaded[directory][0]
  convert.save_hf_checkpoint(str(tmp_path / "ours"), model, params, max_shard_bytes=40_000)
  assert os.path.isfile(tmp_path / "ours" / "model.safetensors.index.json")
  _, again = convert.load_hf_checkpoint(str(tmp_path / "ours"))
  for k, v in _flat(again).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"),
                                                           dtype=torch.float32).eval()
  ids = _ids((1, 5))
  np.testing.assert_allclose(_hf_logits(back, ids), _hf_logits(hf, ids), atol=TOL, rtol=0)


# --- (d) errors ------------------------------------------------------------------------------

def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_pickled_only_directory_is_refused(hf_llama, tmp_path):
  shutil.copy(os.path.join(hf_llama[0], "config.json"), tmp_path / "config.json")
  (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
  with pytest.raises(ConfigError, match=r"no \*\.safetensors.*pytorch_model\.bin.*refused"):
    convert.load_hf_checkpoint(str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(ConfigError, match="has no config.json"):
    convert.load_hf_checkpoint(str(tmp_path))


def test_missing_key_and_wrong_shape_are_named(hf_llama, tmp_path):
  d = _copy(hf_llama[0], tmp_path / "m")
  file = os.path.join(d, "model.safetensors")
  tensors = load_file(file)
  good = tensors.pop("model.layers.1.mlp.up_proj.weight")
  lm_head = tensors.pop("lm_head.weight")
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ConfigError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'"
                                        r", 'lm_head.weight'\]"):
    convert.load_hf_checkpoint(d)
  tensors["model.layers.1.mlp.up_proj.weight"] = good[:, :10]
  tensors["lm_head.weight"] = lm_head
  save_file(tensors, file, metadata={"format": "pt"})
  with pytest.raises(ConfigError, match=r"'model.layers.1.mlp.up_proj.weight' has shape "
                                        r"\(96, 10\).*implies \(96, 64\)"):
    convert.load_hf_checkpoint(d)
  with pytest.raises(ConfigError, match=r"'model.layers.1.mlp.up_proj.weight' is \(96, 10\).*"
                                        r"converted: \(10, 96\).* but layer 1 of "
                                        r"params/layers/mlp/up/kernel \(2, 64, 96\) is "
                                        r"\(64, 96\)"):
    src, = convert.weight_sources(d, "params")
    targets = {p: jax.ShapeDtypeStruct(s, np.float32)
               for p, s in llama.param_shapes(convert.load_hf_checkpoint(hf_llama[0])[0]
                                              .config).items()}
    checkpoint.check_weights(src, targets)


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, r"model_type='mistral' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     r"rope_type='llama3' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"rope_type='linear'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "o_proj"),
])
def test_unsupported_configs_are_config_errors(hf_llama, tmp_path, change, match):
  cfg = json.load(open(os.path.join(hf_llama[0], "config.json")))
  cfg.update(change)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  shutil.copy(os.path.join(hf_llama[0], "model.safetensors"), tmp_path)
  with pytest.raises(ConfigError, match=match):
    convert.load_hf_checkpoint(str(tmp_path))


def test_rope_error_names_the_config_once():
  cfg = dict(model_type="llama", vocab_size=8, hidden_size=8, intermediate_size=16,
             num_hidden_layers=1, num_attention_heads=2,
             rope_scaling={"type": "linear", "factor": 2.0})
  with pytest.raises(ConfigError, match="rope_type='linear'") as e:
    llama.config_from_hf(cfg)
  assert str(e.value).count("config.json (model_type='llama')") == 1, str(e.value)


def test_sparse_text_config_takes_llama_defaults():
  c = llama.config_from_hf(llama.text_config({"vocab_size": 64, "head_dim": None}))
  assert (c.vocab_size, c.width, c.depth, c.num_heads, c.head_dim) == (64, 4096, 32, 32, 128)


# --- (e) pretrained init: straight into shards ------------------------------------------------

def test_weight_sources_read_into_shards_like_load(hf_model, loaded, monkeypatch):
  """8 CPU devices (tests/conftest.py sets them for the session), a 2 x 4 mesh: the layer axis
  over 'a' and the last axis over 'b' where they divide; each shard reads only its layer."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (--xla_force_host_platform_device_count=8)")
  directory, _ = hf_model
  model, params = loaded[directory]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
  want = _flat(params)
  lora = LLM(llama.dataclasses.replace(model.config, lora=LoraConfig(rank=2)))
  shapes = llama.param_shapes(lora.config)
  assert any(p.endswith("lora_a") for p in shapes)

  def spec(shape):
    axes = [None] * len(shape)
    if len(shape) > 1 and shape[0] % 2 == 0:
      axes[0] = "a"
    if shape[-1] % 4 == 0:
      axes[-1] = "b"
    return PartitionSpec(*axes)

  targets = {p: jax.ShapeDtypeStruct(s, np.float32, sharding=NamedSharding(mesh, spec(s)))
             for p, s in shapes.items()}
  src, = convert.weight_sources(directory, "params")
  from bigvl.convert import safetensors_io

  reads = []
  get = safetensors_io.TensorReader.get
  monkeypatch.setattr(safetensors_io.TensorReader, "get",
                      lambda self, key: reads.append(key) or get(self, key))
  got = checkpoint.read_weights(src, targets)
  assert got.keys() == want.keys()  # the LoRA adapters keep their init
  for k, v in got.items():
    assert v.sharding == targets[k].sharding, k
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
  q = got["layers/attn/q/kernel"]
  assert q.addressable_shards[0].data.shape == (1, 64, 4, 4)
  # a stacked leaf sharded over layers: each of the 8 shards read one layer tensor, not two
  assert reads.count("model.layers.0.self_attn.q_proj.weight") == 4
  assert reads.count("model.layers.1.self_attn.q_proj.weight") == 4


def test_read_init_from_takes_hf_directories(hf_qwen2):
  import ml_collections

  from bigvl import train
  from bigvl.config import Reader

  r = Reader(ml_collections.ConfigDict({"lm": {"path": hf_qwen2[0], "dst": "params/llm"}}),
             "config.init_from")
  src, = train.read_init_from(r)
  assert src.dst == "params/llm" and src.what == "config.init_from.lm.path"
  assert src.key_fn("layers/attn/q/bias") == [f"model.layers.{i}.self_attn.q_proj.bias"
                                              for i in range(2)]
  r = Reader(ml_collections.ConfigDict({"lm": {"path": hf_qwen2[0], "src": "x"}}),
             "config.init_from")
  with pytest.raises(ConfigError, match="src='x': not used"):
    train.read_init_from(r)
