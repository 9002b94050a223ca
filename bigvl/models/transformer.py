"""The pre-LayerNorm transformer encoder shared by the image and text towers.

``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` (Vaswani et al. 2017; pre-LN as in ViT). Remat is a
config field, not a code fork.

Options that public checkpoints need (the defaults are the original numerics):

* ``activation`` of the MLP: ``gelu`` (tanh approximation, ``0.5 x (1 + tanh(sqrt(2/pi)
  (x + 0.044715 x^3)))``; SigLIP's ``gelu_pytorch_tanh``), ``gelu_exact`` (``x Phi(x)``;
  LLaVA's projector, HF ``gelu``) or ``quick_gelu`` (``x sigmoid(1.702 x)``; OpenAI CLIP,
  Radford et al. 2021).
* ``norm_eps``: the LayerNorm epsilon (flax's and SigLIP's 1e-6; CLIP 1e-5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical


def quick_gelu(x: jax.Array) -> jax.Array:
  """``x * sigmoid(1.702 x)`` (OpenAI CLIP's GELU approximation)."""
  return x * jax.nn.sigmoid(1.702 * x)


#: MLP activations by name (``activation`` fields); HF ``hidden_act`` names map onto these in
#: ``bigvl.convert.vision``.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=True),
    "gelu_exact": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; choose from {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


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
  """``fc2(act(fc1(x)))``."""

  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = logical.dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    x = activation_fn(self.activation)(x)
    return logical.dense(d, ("mlp", "embed"), dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    y = logical.layer_norm(self.norm_eps, dtype=self.dtype, name="ln1")(x)
    y = attention(self.num_heads, self.dtype, name="attn")(y, y, mask=mask)
    x = x + y
    y = logical.layer_norm(self.norm_eps, dtype=self.dtype, name="ln2")(x)
    return x + MlpBlock(self.mlp_dim, self.dtype, self.activation, name="mlp")(y)


def hidden_index(layer: int, depth: int) -> int:
  """A hidden-state index as in HF's ``hidden_states`` (``0`` = the encoder input, ``k`` = the
  output of block ``k - 1``; negative from the end: ``-1`` = the last block's output, ``-2``
  the penultimate's) -> ``0 .. depth``."""
  if not -(depth + 1) <= layer <= depth:
    raise ValueError(f"layer {layer} out of range for depth {depth} ({depth + 1} hidden states)")
  return layer % (depth + 1)


class Encoder(nn.Module):
  """``depth`` EncoderBlocks and a final LayerNorm. ``mask``: [B, 1, L, L] attention mask.

  ``layer`` (see :func:`hidden_index`): return that hidden state instead, without the final
  LayerNorm; blocks after it are not run (``init`` still creates every parameter).
  """

  depth: int
  num_heads: int
  mlp_dim: int
  remat: bool = False
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               layer: int | None = None) -> jax.Array:
    stop = self.depth if layer is None else hidden_index(layer, self.depth)
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    hidden = x
    for i in range(self.depth):
      if i >= stop and not self.is_initializing():
        break
      x = block(self.num_heads, self.mlp_dim, self.dtype, self.activation, self.norm_eps,
                name=f"block{i}")(x, mask)
      if i + 1 == stop:
        hidden = x
    if layer is not None and not self.is_initializing():
      return hidden
    out = logical.layer_norm(self.norm_eps, dtype=self.dtype, name="ln_final")(x)
    return out if layer is None else hidden


class MAPHead(nn.Module):
  """Multihead attention pooling (a learned probe attends over the tokens), as in SigLIP:
  ``y = MHA(probe, x);  y + MLP(LN(y))``."""

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]), x.dtype)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1]))
    y = attention(self.num_heads, self.dtype, name="attn")(probe, x)
    mlp = MlpBlock(self.mlp_dim, self.dtype, self.activation, name="mlp")
    y = y + mlp(logical.layer_norm(self.norm_eps, name="ln")(y))
    return y[:, 0]
