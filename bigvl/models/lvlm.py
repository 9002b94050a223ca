"""LLaVA-style vision-language model (Liu et al. 2023, "Visual Instruction Tuning"; LLaVA-1.5,
"Improved Baselines with Visual Instruction Tuning", 2023).

    f = ViT(images)[feature_layer]          hidden state of one vision layer (default -2),
                                            CLS dropped (``feature_select='default'``)
    v = W_2 gelu(W_1 f + b_1) + b_2         the ``mlp2x_gelu`` projector (exact GELU) -> D_lm
    e = splice(Embed(ids), ids, image_token_id, v)       (+ soft prompts: LLM.embed_tokens)
    LLM(inputs_embeds=e)

The prompt holds ``N = num_image_tokens`` copies of ``image_token_id`` per image (as
transformers 5's LLaVA processor expands ``<image>``); :func:`bigvl.models.splice.splice`
puts the image features there in order. Rows without placeholders are text only. Calls without
``images`` (decode steps) run no vision compute. Parameters: ``vision/...`` (the ViT),
``projector/{fc1,fc2}``, ``lm/...`` (the :class:`~bigvl.models.llm.LLM` tree).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.llm import LLM, Cache, LLMConfig
from bigvl.models.splice import splice
from bigvl.models.vit import ViT

FEATURE_SELECT = ("default", "full")


class Projector(nn.Module):
  """LLaVA-1.5 ``mlp2x_gelu``: ``fc2(gelu_exact(fc1(x)))``, both to ``width``."""

  width: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = logical.dense(self.width, ("embed", "mlp"), dtype=self.dtype, use_bias=self.use_bias,
                      name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return logical.dense(self.width, ("mlp", "embed"), dtype=self.dtype, use_bias=self.use_bias,
                         name="fc2")(x)


class LVLM(nn.Module):
  """``apply({'params': p}, input_ids, images)`` -> what :class:`LLM` returns (logits, or
  ``(logits, cache)`` with a cache).

  ``vision``: the ViT tower; ``lm``: the decoder's config; ``image_size``: the (square) image
  side the tower takes; ``feature_layer``: the vision hidden state fed to the projector (HF
  ``hidden_states`` indexing, see :func:`bigvl.models.transformer.hidden_index`);
  ``feature_select``: ``'default'`` drops the CLS token when
  the tower has one, ``'full'`` keeps every token. ``init`` needs ``images`` to create the
  vision and projector parameters.
  """

  vision: ViT
  lm: LLMConfig
  image_token_id: int
  image_size: int
  feature_layer: int = -2
  feature_select: str = "default"
  projector_bias: bool = True

  def setup(self):
    if self.feature_select not in FEATURE_SELECT:
      raise ValueError(f"feature_select={self.feature_select!r}; choose from {FEATURE_SELECT}")
    self.projector = Projector(self.lm.width, self.projector_bias, self.lm.dtype)
    self.decoder = LLM(self.lm, name="lm")

  @property
  def num_image_tokens(self) -> int:
    """Placeholders (and projected features) per image."""
    n = self.vision.num_tokens(self.image_size)
    return n - 1 if self.vision.has_cls and self.feature_select == "default" else n

  def image_features(self, images: jax.Array) -> jax.Array:
    """images ``[B, H, W, C]`` -> ``[B, N, D_lm]``; ``[B, K, H, W, C]`` (K images a row) ->
    ``[B, K * N, D_lm]`` (image-major, as their placeholders appear)."""
    lead = images.shape[:-3]
    images = images.reshape((-1,) + images.shape[-3:])
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images are {images.shape[1:3]}, the tower takes {self.image_size}^2")
    f = self.vision(images, feature_layer=self.feature_layer)
    if self.vision.has_cls and self.feature_select == "default":
      f = f[:, 1:]
    v = self.projector(f)
    return v.reshape(lead[:1] + (-1, v.shape[-1]))

  def embed(self, input_ids: jax.Array, images: jax.Array | None = None,
            image_features: jax.Array | None = None) -> jax.Array:
    """The LM's input embeddings ``[B, T, D_lm]`` with image features (computed from
    ``images``, or given: one vision pass serving several prompts) at the placeholders."""
    x = self.decoder.embed_tokens(input_ids)  # maps placeholders, splices soft prompts
    if image_features is None and images is not None:
      image_features = self.image_features(images)
    if image_features is None:
      return x
    return splice(x, input_ids, self.image_token_id, image_features)

  def __call__(self, input_ids: jax.Array, images: jax.Array | None = None, *,
               positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: Cache | None = None,
               cache_index: jax.Array | int = 0, return_hidden: bool = False,
               image_features: jax.Array | None = None):
    """input_ids ``[B, T]`` (``num_image_tokens`` placeholders per image), images ``[B, H, W,
    C]`` / ``[B, K, H, W, C]`` or ``None`` (or their ``image_features``); the other keywords
    are :class:`LLM`'s."""
    return self.decoder(inputs_embeds=self.embed(input_ids, images, image_features),
                        positions=positions,
                        attention_mask=attention_mask, segment_ids=segment_ids, cache=cache,
                        cache_index=cache_index, return_hidden=return_hidden)

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
    """The LM's KV cache (:meth:`LLM.init_cache`; needs no params)."""
    return LLM(self.lm, parent=None).init_cache(batch, length, dtype)
