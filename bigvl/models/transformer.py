"""The pre-LayerNorm transformer encoder shared by the image and text towers.

``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` (Vaswani et al. 2017; pre-LN as in ViT). Remat is a
config field, not a code fork.

Options that public checkpoints need (the defaults are the original numerics):

* ``activation`` of the MLP: ``gelu`` (tanh approximation, ``0.5 x (1 + tanh(sqrt(2/pi)
  (x + 0.044715 x^3)))``; SigLIP's ``gelu_pytorch_tanh``), ``gelu_exact`` (``x Phi(x)``;
  LLaVA's projector, HF ``gelu``) or ``quick_gelu`` (``x sigmoid(1.702 x)``; OpenAI CLIP,
  Radford et al. 2021).
* ``norm_eps``: the LayerNorm epsilon (flax's and SigLIP's 1e-6; CLIP 1e-5).

Speed and memory knobs (each leaves the parameters' names and shapes alone):

* ``dtype=bfloat16``: bf16 operands with float32 accumulation for the projections and the
  MLP, parameters and activations float32 (:mod:`bigvl.models.matmul`: the layouts XLA:CPU
  runs natively); attention's products stay float32 (:mod:`bigvl.models.attention`, whose
  hand-written backward every tower uses);
* ``remat``: ``none`` | ``full`` | ``dots`` | ``dots_no_batch`` (``REMAT_POLICIES``: what a
  block saves for the backward pass; ``True``/``False`` = ``full``/``none``);
* ``scan``: the blocks under ``nn.scan`` (compile time flat in depth); parameters are then
  stacked ``[depth, ...]`` under ``encoder/blocks`` with the leading axis named ``layers``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import attention as attention_lib
from bigvl.models import logical, matmul

#: ``remat`` policies by name: what one block keeps for the backward pass (``none``: all
#: activations; ``full``: only its input; ``dots``: matmul outputs; ``dots_no_batch``: matmul
#: outputs without batch dims -- the projections, not attention's scores).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str) -> str:
  """``remat`` field -> a policy name (``True`` = ``full``, ``False`` = ``none``)."""
  name = {True: "full", False: "none"}[remat] if isinstance(remat, bool) else remat
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; choose from {', '.join(REMAT_POLICIES)}")
  return name


def remat_block(block: type[nn.Module], remat: bool | str, *, scanned: bool = True
                ) -> type[nn.Module]:
  """``block`` under ``nn.remat`` with the named policy (unchanged for ``none``).

  ``scanned``: the block runs as an ``nn.scan`` body, where the loop already keeps XLA from
  merging the recomputation with the forward (``prevent_cse=False``, cheaper). Unrolled
  blocks get ``prevent_cse=True`` (``jax.checkpoint``'s default), else XLA's CSE may fold
  the recomputed forward back into the original. On XLA:CPU only the scanned form lowers
  the step's memory (``docs/benchmarks.md``, knobs)."""
  name = remat_name(remat)
  if name == "none":
    return block
  return nn.remat(block, policy=REMAT_POLICIES[name], prevent_cse=not scanned)


def mixed(dtype) -> bool:
  """Whether ``dtype`` selects the bf16-matmul / f32-activation path."""
  return jnp.dtype(dtype) == jnp.bfloat16


def compute_dtype(dtype):
  """The dtype layers compute their elementwise parts in: float32 on the mixed path."""
  return jnp.float32 if mixed(dtype) else dtype


def dot_kwargs(dtype) -> dict:
  """``dot_general`` for the layers' matmuls (the mixed path's, or flax's default)."""
  return {"dot_general": matmul.dot_general} if mixed(dtype) else {}


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
  fast = ({"qkv_dot_general": matmul.dot_general, "out_dot_general": matmul.dot_general}
          if mixed(dtype) else {})
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dtype=compute_dtype(dtype), name=name,
      attention_fn=attention_lib.attention_fn, **fast,
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
    d, dt, kw = x.shape[-1], compute_dtype(self.dtype), dot_kwargs(self.dtype)
    x = logical.dense(self.mlp_dim, ("embed", "mlp"), dtype=dt, name="fc1", **kw)(x)
    x = activation_fn(self.activation)(x)
    return logical.dense(d, ("mlp", "embed"), dtype=dt, name="fc2", **kw)(x)


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    dt = compute_dtype(self.dtype)
    y = logical.layer_norm(self.norm_eps, dtype=dt, name="ln1")(x)
    y = attention(self.num_heads, self.dtype, name="attn")(y, y, mask=mask)
    x = logical.constrain(x + y, "batch", "length", "act_embed")
    y = logical.layer_norm(self.norm_eps, dtype=dt, name="ln2")(x)
    y = MlpBlock(self.mlp_dim, self.dtype, self.activation, name="mlp")(y)
    return logical.constrain(x + y, "batch", "length", "act_embed")


def hidden_index(layer: int, depth: int) -> int:
  """A hidden-state index as in HF's ``hidden_states`` (``0`` = the encoder input, ``k`` = the
  output of block ``k - 1``; negative from the end: ``-1`` = the last block's output, ``-2``
  the penultimate's) -> ``0 .. depth``."""
  if not -(depth + 1) <= layer <= depth:
    raise ValueError(f"layer {layer} out of range for depth {depth} ({depth + 1} hidden states)")
  return layer % (depth + 1)


class _ScanBlock(nn.Module):
  """An EncoderBlock in ``nn.scan``'s ``(carry, broadcast) -> (carry, out)`` form."""

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None):
    return EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, self.activation,
                        self.norm_eps, name="block")(x, mask), None


class Encoder(nn.Module):
  """``depth`` EncoderBlocks and a final LayerNorm. ``mask``: [B, 1, L, L] attention mask.

  ``layer`` (see :func:`hidden_index`): return that hidden state instead, without the final
  LayerNorm; blocks after it are not run (``init`` still creates every parameter). Not with
  ``scan`` (one compiled body runs every layer).
  """

  depth: int
  num_heads: int
  mlp_dim: int
  remat: bool | str = False
  dtype: jnp.dtype = jnp.float32
  activation: str = "gelu"
  norm_eps: float = 1e-6
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               layer: int | None = None) -> jax.Array:
    args = (self.num_heads, self.mlp_dim, self.dtype, self.activation, self.norm_eps)
    if self.scan:
      if layer is not None:
        raise ValueError("Encoder(scan=True) returns the last layer only; set scan=False to "
                         "read hidden state layer={layer}")
      blocks = nn.scan(remat_block(_ScanBlock, self.remat), variable_axes={"params": 0},
                       split_rngs={"params": True}, in_axes=(nn.broadcast,),
                       length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = blocks(*args, name="blocks")(x, mask)
      return logical.layer_norm(self.norm_eps, dtype=compute_dtype(self.dtype),
                                name="ln_final")(x)
    stop = self.depth if layer is None else hidden_index(layer, self.depth)
    block = remat_block(EncoderBlock, self.remat, scanned=False)
    hidden = x
    for i in range(self.depth):
      if i >= stop and not self.is_initializing():
        break
      x = block(*args, name=f"block{i}")(x, mask)
      if i + 1 == stop:
        hidden = x
    if layer is not None and not self.is_initializing():
      return hidden
    out = logical.layer_norm(self.norm_eps, dtype=compute_dtype(self.dtype),
                             name="ln_final")(x)
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
    y = y + mlp(logical.layer_norm(self.norm_eps, dtype=compute_dtype(self.dtype),
                                   name="ln")(y))
    return y[:, 0]
