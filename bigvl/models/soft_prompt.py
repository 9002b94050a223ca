"""Soft prompts: learned input vectors in place of prompt tokens (Lester et al. 2021, "The Power
of Scale for Parameter-Efficient Prompt Tuning"; as used with LoRA in "Discriminative
Fine-tuning of LVLMs", Ouali et al. 2025).

``K`` vectors ``P in R^{K x D}`` take the places of the ``K`` copies of a placeholder id
(``LLMConfig.soft_prompt_id``) that a prompt template puts in the text, in order
(:func:`bigvl.models.splice.splice`): where the prompt goes is data, not code. Initialised
``N(0, 0.02^2)`` like the token embeddings.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from bigvl.models import logical


class SoftPrompt(nn.Module):
  num_tokens: int
  width: int

  @nn.compact
  def __call__(self) -> jax.Array:
    """The prompt vectors ``[num_tokens, width]``."""
    return self.param("prompt", logical.named(nn.initializers.normal(0.02), None, "embed"),
                      (self.num_tokens, self.width))
