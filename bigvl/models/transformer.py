"""The pre-LayerNorm transformer encoder shared by the image and text towers.

``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` (Vaswani et al. 2017; pre-LN as in ViT). Remat is a
config field, not a code fork.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical


def attention(num_heads: int, dtype: jnp.dtype, *, name: str) -> nn.MultiHeadDotProductAttention:
  """Multi-head attention with logical axes: q/k/v kernels ``[embed, heads, kv]``, the output
  kernel ``[heads, kv, embed]``."""
  zeros = nn.initializers.zeros_init()
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dtype=dtype, name=name,
      kernel_init=logical.named(logical.DEFAULT_KERNEL_INIT, "embed", "heads", "kv"),
      bias_init=logical.named(zeros, "heads", "kv"),
      out_kernel_init=logical.named(logical.DEFAULT_KERNEL_INIT, "heads", "kv", "embed"),
      out_bias_init=logical.named(zeros, "embed"))


class MlpBlock(nn.Module):
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = logical.dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x)
    return logical.dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    y = logical.layer_norm(dtype=self.dtype, name="ln1")(x)
    y = attention(self.num_heads, self.dtype, name="attn")(y, y, mask=mask)
    x = x + y
    y = logical.layer_norm(dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(y)


class Encoder(nn.Module):
  """``depth`` EncoderBlocks and a final LayerNorm. ``mask``: [B, 1, L, L] attention mask."""

  depth: int
  num_heads: int
  mlp_dim: int
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dtype, name=f"block{i}")(x, mask)
    return logical.layer_norm(dtype=self.dtype, name="ln_final")(x)


class MAPHead(nn.Module):
  """Multihead attention pooling (a learned probe attends over the tokens), as in SigLIP."""

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]), x.dtype)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1]))
    y = attention(self.num_heads, self.dtype, name="attn")(probe, x)
    y = y + MlpBlock(self.mlp_dim, self.dtype, name="mlp")(logical.layer_norm(name="ln")(y))
    return y[:, 0]
