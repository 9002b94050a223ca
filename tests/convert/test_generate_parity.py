"""Greedy generation from an imported checkpoint equals transformers' own ``generate``.

Tiny random Llama (untied) and Qwen2 (tied, q/k/v biases) from ``conftest``, plus a Qwen2
with a wider init (``initializer_range=0.2``): with the default 0.02 a tied random Qwen2 only
repeats its last prompt token (the residual stream is dominated by the tied embedding), which
would leave the decode loop's positions/cache largely untested. transformers runs each
prompt alone (no padding); bigvl runs all prompts (different lengths, left-padded into one
batch) in a single :func:`bigvl.generate.generate` call. EOS is an id outside the vocabulary
on both sides, so neither stops early; the tokens must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bigvl import convert, generate  # noqa: E402

from .conftest import _build  # noqa: E402

NEW_TOKENS = 12
#: lengths straddle the prompt bucket (16), so one batch mixes heavy and no left-padding.
PROMPT_LENGTHS = (3, 9, 16, 21)
NO_EOS = 10_000  # not a token id of the 128-word vocabulary: generation never stops early


@pytest.fixture(scope="module")
def hf_qwen2_wide(tmp_path_factory):
  """``(directory, torch model)``: tied Qwen2 whose greedy continuations vary."""
  model = _build("Qwen2ForCausalLM", "Qwen2Config", 2, tie_word_embeddings=True,
                 initializer_range=0.2)
  path = str(tmp_path_factory.mktemp("qwen2_wide"))
  model.save_pretrained(path, safe_serialization=True)
  return path, model


def _prompts(seed: int) -> list[list[int]]:
  rs = np.random.RandomState(seed)
  return [rs.randint(1, 128, n).tolist() for n in PROMPT_LENGTHS]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
  ids = torch.tensor([prompt])
  with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, eos_token_id=NO_EOS,
                         pad_token_id=0, temperature=None, top_k=None, top_p=None)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("which", ["hf_llama", "hf_qwen2", "hf_qwen2_wide"])
def test_greedy_tokens_match_transformers(which, request):
  directory, hf = request.getfixturevalue(which)
  model, params = convert.load_hf_checkpoint(directory)
  prompts = _prompts(seed=0)
  ours = generate.generate(model, params, prompts, NEW_TOKENS)
  assert ours.shape == (len(prompts), NEW_TOKENS)
  theirs = np.array([_hf_greedy(hf, prompt, NEW_TOKENS) for prompt in prompts])
  assert theirs.shape == ours.shape
  for b, prompt in enumerate(prompts):
    assert ours[b].tolist() == theirs[b].tolist(), (
        f"{which} prompt {b} (length {len(prompt)}): bigvl {ours[b].tolist()} != "
        f"transformers {theirs[b].tolist()}")
  if which != "hf_qwen2":  # non-degenerate continuations: the comparison has teeth
    assert all(len(set(row)) > NEW_TOKENS // 3 for row in theirs.tolist()), theirs
