"""CLIP / SigLIP vision towers: imported outputs (``last_hidden_state``, ``pooler_output``,
``hidden_states[-2]``) equal transformers' own, standalone towers and the vision half of full
``clip``/``siglip`` checkpoints, and exports load back into transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from bigvl import convert  # noqa: E402
from bigvl.config import ConfigError  # noqa: E402
from bigvl.convert import rules, vision  # noqa: E402
from bigvl.models.vit import ViT  # noqa: E402

TOL = 1e-4
SIZE = 16
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             image_size=SIZE, patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
KINDS = ("clip_vision_model", "siglip_vision_model", "clip", "siglip")


def _randomize(model):
  """Norms start at ones/zeros: randomise them (and biases) so a mix-up would show."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  return model.eval()


def _build(kind: str, seed: int):
  torch.manual_seed(seed)
  t = transformers
  if kind == "clip_vision_model":
    model = t.CLIPVisionModel(t.CLIPVisionConfig(**TOWER))
  elif kind == "siglip_vision_model":
    model = t.SiglipVisionModel(t.SiglipVisionConfig(**TOWER))
  elif kind == "clip":
    model = t.CLIPModel(t.CLIPConfig(vision_config=TOWER, text_config=TEXT))
  else:
    model = t.SiglipModel(t.SiglipConfig(vision_config=TOWER, text_config=TEXT))
  return _randomize(model)


@pytest.fixture(scope="session")
def hf_towers(tmp_path_factory):
  """``{kind: (directory, torch vision tower)}``, saved once (safetensors)."""
  out = {}
  for seed, kind in enumerate(KINDS):
    model = _build(kind, seed)
    path = str(tmp_path_factory.mktemp(kind))
    model.save_pretrained(path, safe_serialization=True)
    out[kind] = path, model if kind.endswith("_vision_model") else model.vision_model
  return out


@pytest.fixture(scope="module")
def loaded(hf_towers):
  return {kind: convert.load_hf_checkpoint(path) for kind, (path, _) in hf_towers.items()}


def _pixels(seed=0, batch=2):
  return np.random.RandomState(seed).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)


def _hf(tower, pixels):
  with torch.no_grad():
    o = tower(pixel_values=torch.tensor(pixels), output_hidden_states=True)
  return {"last_hidden_state": o.last_hidden_state.numpy(),
          "pooler_output": o.pooler_output.numpy(),
          "hidden_states": [h.numpy() for h in o.hidden_states]}


def _ours(vit, params, pixels):
  images = jnp.asarray(pixels.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  out = vision.hf_outputs(vit, params, images)
  out["hidden_states"] = [vit.apply({"params": params}, images, feature_layer=k)
                          for k in range(vit.depth + 1)]
  out["hidden_-2"] = vit.apply({"params": params}, images, feature_layer=-2)
  return out


def _assert_close(ours, hf):
  for k in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(ours[k], hf[k], atol=TOL, rtol=0, err_msg=k)
  np.testing.assert_allclose(ours["hidden_-2"], hf["hidden_states"][-2], atol=TOL, rtol=0)
  assert len(ours["hidden_states"]) == len(hf["hidden_states"])
  for i, (a, b) in enumerate(zip(ours["hidden_states"], hf["hidden_states"], strict=True)):
    np.testing.assert_allclose(a, b, atol=TOL, rtol=0, err_msg=f"hidden_states[{i}]")


@pytest.mark.parametrize("kind", KINDS)
def test_import_matches_transformers(kind, hf_towers, loaded):
  _, tower = hf_towers[kind]
  vit, params = loaded[kind]
  clip = kind.startswith("clip")
  assert isinstance(vit, ViT)
  assert (vit.pool, vit.activation, vit.norm_eps, vit.patch_bias, vit.pre_norm) == (
      ("tok", "quick_gelu", 1e-5, False, True) if clip else ("map", "gelu", 1e-6, True, False))
  pixels = _pixels()
  ours, hf = _ours(vit, params, pixels), _hf(tower, pixels)
  _assert_close(ours, hf)
  # The layers differ (a mapping that read one layer's weights everywhere would not).
  assert np.abs(hf["hidden_states"][-2] - hf["hidden_states"][-1]).max() > 1e-2


def test_full_checkpoint_tower_equals_standalone_layout(hf_towers, loaded, tmp_path):
  """A tower saved standalone with the legacy ``vision_model.`` prefix imports the same."""
  path, _ = hf_towers["clip"]
  tensors = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items()
             if k.startswith("vision_model.")}
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  cfg = json.load(open(os.path.join(path, "config.json")))["vision_config"]
  json.dump({**cfg, "model_type": "clip_vision_model"}, open(tmp_path / "config.json", "w"))
  vit, params = convert.load_hf_checkpoint(str(tmp_path))
  want_vit, want = loaded["clip"]
  assert vit == want_vit
  jax.tree.map(np.testing.assert_array_equal, params, want)


@pytest.mark.parametrize("kind", ["clip_vision_model", "siglip"])
def test_export_round_trip(kind, hf_towers, loaded, tmp_path):
  vit, params = loaded[kind]
  out = str(tmp_path / "export")
  convert.save_hf_checkpoint(out, vit, params)
  cfg = json.load(open(os.path.join(out, "config.json")))
  model_type = "clip_vision_model" if kind.startswith("clip") else "siglip_vision_model"
  assert cfg["model_type"] == model_type
  cls = getattr(transformers, vision.ARCHITECTURES[model_type])
  back, info = cls.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  pixels = _pixels(seed=3)
  hf, again = _hf(hf_towers[kind][1], pixels), _hf(back.eval(), pixels)
  for k in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(again[k], hf[k], atol=1e-6, rtol=0)
  vit2, params2 = convert.load_hf_checkpoint(out)
  assert vit2 == vit
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_siglip_without_head(tmp_path):
  torch.manual_seed(7)
  tower = _randomize(transformers.SiglipVisionModel(
      transformers.SiglipVisionConfig(**TOWER, vision_use_head=False)))
  tower.save_pretrained(str(tmp_path), safe_serialization=True)
  vit, params = convert.load_hf_checkpoint(str(tmp_path))
  assert vit.pool == "none" and "map_head" not in params
  pixels = _pixels(seed=1)
  got = vit.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert got[0] is None
  np.testing.assert_allclose(got[1], _hf_last(tower, pixels), atol=TOL, rtol=0)


def _hf_last(tower, pixels):
  with torch.no_grad():
    return tower(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()


def test_errors(hf_towers, tmp_path):
  path, _ = hf_towers["siglip_vision_model"]
  tensors = load_file(os.path.join(path, "model.safetensors"))
  del tensors["head.probe"]
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  json.dump(json.load(open(os.path.join(path, "config.json"))),
            open(tmp_path / "config.json", "w"))
  with pytest.raises(ConfigError, match="head.probe"):
    convert.load_hf_checkpoint(str(tmp_path))
  gap = ViT(patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=16, pool="gap")
  params = gap.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
  with pytest.raises(ConfigError):
    convert.save_hf_checkpoint(str(tmp_path / "x"), gap, params)
  with pytest.raises(ConfigError, match="pool"):
    vision.save(str(tmp_path / "y"), gap, params, "siglip_vision_model")


@pytest.mark.parametrize("kind", ["clip_vision_model", "siglip"])
def test_weight_sources_read_like_load(kind, hf_towers, loaded):
  from jax.sharding import SingleDeviceSharding

  from bigvl import checkpoint

  _, params = loaded[kind]
  want = rules.flatten(params)
  sharding = SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(v.shape, np.float32, sharding=sharding)
             for p, v in want.items()}
  src, = convert.weight_sources(hf_towers[kind][0], "params/img")
  got = checkpoint.read_weights(src, targets)
  assert got.keys() == want.keys()
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
