"""Soft prompts: learned input vectors in place of prompt tokens (Lester et al. 2021, "The Power
of Scale for Parameter-Efficient Prompt Tuning"; as used with LoRA in "Discriminative
Fine-tuning of LVLMs", Ouali et al. CVPR 2025).

Each :class:`SoftPromptSpec` gives ``K`` vectors ``P in R^{K x D}`` that take the places of the
``K`` copies of its placeholder id in the input, in order (:func:`bigvl.models.splice.splice`):
where a prompt goes is data (a template), not code. A prompt either starts random
(``N(0, 0.02^2)``, like the token embeddings) or from the embeddings of a hand-written
prompt's tokens ``w_1..w_K``:

    P = E[w] + Delta,    Delta = 0 at init (the trained parameter)

which, with the embedding table ``E`` frozen, is exactly "initialise the soft prompt from the
hand-written prompt's token embeddings" (VladVA), in a form the pretrained-init hook cannot
overwrite: ``E`` comes from the checkpoint, ``Delta`` is new.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from bigvl.models import logical


@dataclasses.dataclass(frozen=True)
class SoftPromptSpec:
  """``num_tokens`` vectors at the copies of placeholder ``id``; ``init_ids``: the token ids
  whose embeddings they start from (``len == num_tokens``), or empty (random)."""

  id: int
  num_tokens: int
  init_ids: tuple[int, ...] = ()

  def __post_init__(self):
    if self.num_tokens < 1 or (self.init_ids and len(self.init_ids) != self.num_tokens):
      raise ValueError(f"soft prompt {self}: num_tokens >= 1 and as many init_ids")


class SoftPrompt(nn.Module):
  spec: SoftPromptSpec
  width: int

  @nn.compact
  def __call__(self, init_embeds: jax.Array | None = None) -> jax.Array:
    """The prompt vectors ``[num_tokens, width]``; ``init_embeds``: ``E[init_ids]``."""
    shape = (self.spec.num_tokens, self.width)
    if init_embeds is None:
      return self.param("prompt", logical.named(nn.initializers.normal(0.02), None, "embed"),
                        shape)
    delta = self.param("delta", logical.named(nn.initializers.zeros_init(), None, "embed"),
                       shape)
    return init_embeds + delta.astype(init_embeds.dtype)
