"""Tiny random transformers decoders (Llama untied, Qwen2 tied) saved as safetensors, built
once per session."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
            rms_norm_eps=1e-5, max_position_embeddings=256)


def _build(cls_name: str, config_name: str, seed: int, **kw):
  torch.manual_seed(seed)
  config = getattr(transformers, config_name)(**{**TINY, **kw})
  model = getattr(transformers, cls_name)._from_config(config, dtype=torch.float32,
                                                       attn_implementation="eager")
  with torch.no_grad():  # norms start at ones: randomise them so a mix-up would show
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _saved(tmp_path_factory, name: str, *args, **kw):
  """``(directory, torch model)`` of :func:`_build` saved as safetensors."""
  model = _build(*args, **kw)
  path = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory):
  """``(directory, torch model)``: untied Llama."""
  return _saved(tmp_path_factory, "llama", "LlamaForCausalLM", "LlamaConfig", 0,
                tie_word_embeddings=False)


@pytest.fixture(scope="session")
def hf_qwen2(tmp_path_factory):
  """``(directory, torch model)``: Qwen2 with tied embeddings."""
  return _saved(tmp_path_factory, "qwen2", "Qwen2ForCausalLM", "Qwen2Config", 1,
                tie_word_embeddings=True)


@pytest.fixture(params=["llama", "qwen2"])
def hf_model(request):
  """Both families, one at a time."""
  return request.getfixturevalue(f"hf_{request.param}")
