"""Transformer text tower: token + learned position embeddings -> pre-LN encoder (padding
masked) -> pooling at the last real token (``eos``, as CLIP) or a masked mean (``mean``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.transformer import Encoder, compute_dtype


class TextTransformer(nn.Module):
  vocab_size: int
  max_len: int = 16
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  pool: str = "eos"
  causal: bool = False
  remat: bool | str = False
  pad_id: int = 0
  dtype: jnp.dtype = jnp.float32
  scan: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """tokens: int [B, L] (0 = padding) -> (pooled [B, width], per-token [B, L, width])."""
    valid = tokens != self.pad_id
    dt = compute_dtype(self.dtype)
    x = nn.Embed(self.vocab_size, self.width,
                 embedding_init=logical.named(nn.initializers.normal(0.02), "vocab", "embed"),
                 name="token_embedding")(tokens).astype(dt)
    pos = self.param("pos_embedding", logical.named(nn.initializers.normal(0.01), None, None,
                                                    "embed"), (1, self.max_len, self.width))
    x = x + pos[:, : tokens.shape[1]].astype(dt)
    mask = nn.make_attention_mask(valid, valid)
    if self.causal:
      mask = nn.combine_masks(mask, nn.make_causal_mask(tokens))
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype,
                scan=self.scan, name="encoder")(x, mask)
    if self.pool == "eos":
      last = jnp.maximum(valid.sum(axis=1) - 1, 0)
      pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
    elif self.pool == "mean":
      w = valid[..., None].astype(x.dtype)
      pooled = (x * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)
    else:
      raise ValueError(f"unknown pool {self.pool!r}")
    return pooled, x
