"""Vision Transformer image tower (Dosovitskiy et al. 2021): patchify -> + learned position
embedding -> pre-LN encoder -> pooling (``gap`` mean, ``map`` attention probe, ``tok`` CLS)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.transformer import Encoder, MAPHead


class ViT(nn.Module):
  patch_size: int = 4
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  pool: str = "gap"
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images: [B, H, W, C] -> (pooled [B, width], tokens [B, N, width])."""
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=logical.named(logical.DEFAULT_KERNEL_INIT, None, None, None,
                                          "embed"),
                bias_init=logical.named(nn.initializers.zeros_init(), "embed"),
                name="embedding")(images.astype(self.dtype))
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.pool == "tok":
      cls = self.param("cls", logical.named(nn.initializers.zeros, None, None, "embed"),
                       (1, 1, d), x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    pos = self.param("pos_embedding", logical.named(nn.initializers.normal(0.02), None, None,
                                                    "embed"), (1, x.shape[1], d), x.dtype)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype,
                name="encoder")(x + pos)
    if self.pool == "gap":
      pooled = x.mean(axis=1)
    elif self.pool == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, self.dtype, name="map_head")(x)
    elif self.pool == "tok":
      pooled = x[:, 0]
    else:
      raise ValueError(f"unknown pool {self.pool!r}")
    return pooled, x
