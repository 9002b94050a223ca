"""Vision Transformer image tower (Dosovitskiy et al. 2021): patchify -> (+ CLS) + learned
position embedding -> (pre-LN) -> pre-LN encoder -> final LN -> pooling (``gap`` mean, ``map``
attention probe, ``tok`` CLS, ``none``).

One encoder with options covers the public towers (``bigvl.convert.vision`` loads them):

* CLIP (Radford et al. 2021): ``pool='tok'`` (pooled = final LN of the CLS token, HF's
  ``post_layernorm``), ``pre_norm=True`` (HF's ``pre_layrnorm`` on ``patches + pos``),
  ``patch_bias=False``, ``activation='quick_gelu'``, ``norm_eps=1e-5``.
* SigLIP (Zhai et al. 2023): ``pool='map'`` (MAP head over the final-LN tokens),
  ``patch_bias=True``, ``activation='gelu'`` (tanh), ``norm_eps=1e-6``; no CLS, no pre-LN.

``__call__(images, feature_layer=k)`` returns hidden state ``k`` instead of the pooled output
(HF ``hidden_states[k]``: ``0`` = the encoder input, ``-1`` = the last block's output, ``-2`` =
the penultimate block's, no final LN), as LVLMs read their vision features.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.transformer import Encoder, MAPHead, compute_dtype, dot_kwargs

POOLS = ("gap", "map", "tok", "none")


class PatchEmbed(nn.Module):
  """Non-overlapping ``p x p`` patches -> ``width``: a stride-``p`` convolution, computed as
  one matmul of the flattened patches ``[B, H/p, W/p, p*p*C] @ kernel.reshape(p*p*C,
  width)`` (the same parameters as ``nn.Conv``: ``kernel [p, p, C, width]``, ``bias``;
  XLA:CPU runs the convolution's weight gradient far slower than this matmul's)."""

  patch_size: int
  width: int
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p, (b, hh, ww, c) = self.patch_size, images.shape
    kernel = self.param("kernel", logical.named(logical.DEFAULT_KERNEL_INIT, None, None, None,
                                                "embed"), (p, p, c, self.width))
    h, w = hh // p, ww // p
    x = images[:, : h * p, : w * p].astype(compute_dtype(self.dtype))
    x = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, p * p * c)
    dot = dot_kwargs(self.dtype).get("dot_general", jax.lax.dot_general)
    y = dot(x, kernel.reshape(p * p * c, self.width).astype(x.dtype),
            (((3,), (0,)), ((), ())))
    if self.use_bias:
      y = y + self.param("bias", logical.named(nn.initializers.zeros_init(), "embed"),
                         (self.width,)).astype(y.dtype)
    return y


class ViT(nn.Module):
  patch_size: int = 4
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  pool: str = "gap"
  remat: bool | str = False
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6
  patch_bias: bool = True
  pre_norm: bool = False
  scan: bool = False

  @property
  def has_cls(self) -> bool:
    """Whether the token sequence starts with a CLS token (``pool='tok'``)."""
    return self.pool == "tok"

  def num_tokens(self, image_size: int) -> int:
    """Tokens per ``image_size`` x ``image_size`` image (patches, + 1 with a CLS token)."""
    return (image_size // self.patch_size) ** 2 + int(self.has_cls)

  @nn.compact
  def __call__(self, images: jax.Array, *, feature_layer: int | None = None):
    """images: [B, H, W, C] -> (pooled [B, width] (``None`` for ``pool='none'``), tokens
    [B, N, width] after the final LayerNorm); with ``feature_layer``: hidden state
    ``feature_layer`` [B, N, width] only (the pooling head is not run)."""
    if self.pool not in POOLS:
      raise ValueError(f"unknown pool {self.pool!r}; choose from {POOLS}")
    x = PatchEmbed(self.patch_size, self.width, self.patch_bias, self.dtype,
                   name="embedding")(images)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    if self.has_cls:
      cls = self.param("cls", logical.named(nn.initializers.zeros, None, None, "embed"),
                       (1, 1, d), x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    pos = self.param("pos_embedding", logical.named(nn.initializers.normal(0.02), None, None,
                                                    "embed"), (1, x.shape[1], d), x.dtype)
    x = x + pos
    if self.pre_norm:
      x = logical.layer_norm(self.norm_eps, dtype=compute_dtype(self.dtype), name="pre_ln")(x)
    x = Encoder(self.depth, self.num_heads, self.mlp_dim, self.remat, self.dtype,
                self.activation, self.norm_eps, self.scan,
                name="encoder")(x, layer=feature_layer)
    if feature_layer is not None and not self.is_initializing():
      return x
    if self.pool == "gap":
      pooled = x.mean(axis=1)
    elif self.pool == "map":
      pooled = MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.activation,
                       self.norm_eps, name="map_head")(x)
    elif self.pool == "tok":
      pooled = x[:, 0]
    else:
      pooled = None
    return x if feature_layer is not None else (pooled, x)
