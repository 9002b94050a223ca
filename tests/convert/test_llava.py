"""LLaVA checkpoints: a tiny random ``LlavaForConditionalGeneration`` (CLIP tower, Llama
decoder) imports to an LVLM whose logits equal transformers' own on prompts with image
placeholders; both key layouts import; the export loads back into transformers."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from bigvl import convert  # noqa: E402
from bigvl.convert import llava  # noqa: E402
from bigvl.models.lvlm import LVLM  # noqa: E402

TOL = 1e-4
SIZE, VOCAB, IMG = 16, 96, 95
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=SIZE, patch_size=4)
TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=50000.0, max_position_embeddings=256, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def hf_llava(tmp_path_factory):
  """``(directory, torch model)``, saved once (safetensors)."""
  torch.manual_seed(0)
  config = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION),
                                    text_config=transformers.LlamaConfig(**TEXT),
                                    image_token_index=IMG)
  model = transformers.LlavaForConditionalGeneration._from_config(
      config, dtype=torch.float32, attn_implementation="eager")
  with torch.no_grad():  # norms start at ones/zeros: randomise them so a mix-up would show
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  path = str(tmp_path_factory.mktemp("llava"))
  model.eval().save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope="module")
def loaded(hf_llava):
  return convert.load_hf_checkpoint(hf_llava[0])


def _prompt(n):
  """Two rows of 7 + n tokens, each with one image's n placeholders at a different place."""
  rng = np.random.RandomState(0)
  rows = []
  for before in (2, 5):
    text = rng.randint(0, IMG, 7)
    rows.append(np.concatenate([text[:before], np.full(n, IMG), text[before:]]))
  return np.stack(rows).astype(np.int64)


def _pixels(seed=0, batch=2):
  return np.random.RandomState(seed).normal(size=(batch, 3, SIZE, SIZE)).astype(np.float32)


def _hf_logits(model, ids, pixels=None):
  kw = {} if pixels is None else {"pixel_values": torch.tensor(pixels)}
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), **kw).logits.float().numpy()


def _ours(model, params, ids, pixels=None):
  images = None if pixels is None else jnp.asarray(pixels.transpose(0, 2, 3, 1))
  return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids, jnp.int32),
                                         images))


def test_config(loaded):
  model, params = loaded
  assert isinstance(model, LVLM)
  assert (model.image_token_id, model.image_size, model.feature_layer,
          model.feature_select) == (IMG, SIZE, -2, "default")
  assert model.num_image_tokens == (SIZE // 4) ** 2
  assert model.vision.pool == "tok" and model.vision.activation == "quick_gelu"
  assert (model.lm.width, model.lm.depth, model.lm.vocab_size) == (48, 2, VOCAB)
  assert set(params) == {"vision", "projector", "lm"}


def test_logits_match_transformers(hf_llava, loaded):
  model, params = loaded
  ids, pixels = _prompt(model.num_image_tokens), _pixels()
  want = _hf_logits(hf_llava[1], ids, pixels)
  got = _ours(model, params, ids, pixels)
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
  # The image matters to every position after the placeholders.
  other = _hf_logits(hf_llava[1], ids, _pixels(seed=1))
  assert np.abs(other[:, -1] - want[:, -1]).max() > 1e-3
  # Text only: no pixels, no placeholders.
  text = ids[:, ids[1] != IMG][:, :6]
  np.testing.assert_allclose(_ours(model, params, text), _hf_logits(hf_llava[1], text),
                             atol=TOL, rtol=0)


def test_state_dict_layout_imports_the_same(hf_llava, loaded, tmp_path):
  """transformers >= 4.52's in-memory names (``model.language_model.*``, ``lm_head.*``,
  ``model.vision_tower.*``) import to the same params."""
  path, model = hf_llava
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert "lm_head.weight" in state and "model.multi_modal_projector.linear_1.weight" in state
  save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  with open(tmp_path / "config.json", "w") as f:
    json.dump(cfg, f)
  _, params = convert.load_hf_checkpoint(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, loaded[1])


def test_export_round_trip(hf_llava, loaded, tmp_path):
  model, params = loaded
  out = str(tmp_path / "export")
  convert.save_hf_checkpoint(out, model, params)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == "llava"
  back, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids, pixels = _prompt(model.num_image_tokens), _pixels(seed=2)
  np.testing.assert_allclose(_hf_logits(back.eval(), ids, pixels),
                             _hf_logits(hf_llava[1], ids, pixels), atol=1e-6, rtol=0)
  model2, params2 = llava.load(out)
  assert model2 == model
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_weight_sources_read_like_load(hf_llava, loaded):
  from jax.sharding import SingleDeviceSharding

  from bigvl import checkpoint
  from bigvl.convert import rules

  want = rules.flatten(loaded[1])
  sharding = SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(v.shape, np.float32, sharding=sharding)
             for p, v in want.items()}
  src, = convert.weight_sources(hf_llava[0], "params")
  got = checkpoint.read_weights(src, targets)
  assert got.keys() == want.keys()
  for k, v in got.items():
    np.testing.assert_array_equal(np.asarray(v), want[k], err_msg=k)
