"""Decoder-only language model, Llama/Qwen2-shaped (Touvron et al. 2023; Qwen2 2024).

Per layer (pre-norm):

    h = x + W_o Attn(RoPE(W_q n1(x)), RoPE(W_k n1(x)), W_v n1(x))      n = RMSNorm
    y = h + W_down (silu(W_gate n2(h)) * W_up n2(h))                    (SwiGLU)

* RMSNorm: ``x / sqrt(mean(x^2) + eps) * g`` in float32.
* RoPE (Su et al. 2021), the "rotate half" layout of the public checkpoints: for head dim
  ``d`` and ``i < d/2``, ``theta_i = rope_theta^(-2i/d)``; features ``i`` and ``i + d/2`` are
  rotated by ``pos * theta_i``.
* Grouped-query attention: ``num_kv_heads`` divides ``num_heads``; optional q/k/v biases
  (Qwen2). ``jax.nn.dot_product_attention`` (the fused cuDNN kernel on GPUs).
* Tied (``lm_head = embedding^T``) or untied output embeddings.
* Layers under ``nn.scan`` (compile time flat in depth; parameters ``[layers, ...]``), remat
  policy by config.

Attention is over *slots*: a call writes its ``T`` tokens at cache slots ``cache_index ..
cache_index + T - 1`` and a query attends to every earlier-or-equal slot whose key is valid
(``attention_mask [B, S]``) and, with ``segment_ids``, in its own segment (packed sequences).
Without a cache the slots are ``0 .. T-1``. ``positions [B, T]`` feed RoPE; left-padded
prompts of different lengths get their own positions, so a batch decodes as each prompt
alone would. The KV cache (:meth:`LLM.init_cache`) is preallocated ``[layers, B, S, kv_heads,
head_dim]`` and carried through the layer scan, updated in place at one slot per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical, splice
from bigvl.models.lora import LoraConfig, Projection
from bigvl.models.soft_prompt import SoftPrompt, SoftPromptSpec
from bigvl.models.transformer import REMAT_POLICIES, remat_block

Cache = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  vocab_size: int = 256
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  lora: LoraConfig = LoraConfig()
  #: soft prompts: learned vectors replace the copies of each one's placeholder id in the
  #: input (:mod:`bigvl.models.soft_prompt`); parameters ``soft_prompts_<j>``.
  soft_prompts: tuple[SoftPromptSpec, ...] = ()

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                       f"num_heads={self.num_heads}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose from {sorted(REMAT_POLICIES)}")

  @property
  def num_params(self) -> int:
    """Parameter count (no adapters)."""
    d, h, k, hd, m = self.width, self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim
    attn = d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.qkv_bias else 0)
    layer = attn + 3 * d * m + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.depth * layer + emb + d


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical.named(nn.initializers.ones_init(), "norm"),
                       (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(self.dtype) * scale.astype(self.dtype)  # cast first, as the public models


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half layout. x: [B, T, H, D]; positions: [B, T]."""
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
  cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_slots: jax.Array, num_keys: int, key_valid: jax.Array,
                   q_segments: jax.Array | None = None,
                   k_segments: jax.Array | None = None) -> jax.Array:
  """``[B, 1, T, S]`` bool: key slot ``j <= q_slot``, key valid, same segment."""
  k_slots = jnp.arange(num_keys)
  mask = (k_slots[None, :] <= q_slots[:, None])[None, None] & key_valid[:, None, None, :]
  if q_segments is not None:
    mask = mask & (q_segments[:, None, :, None] == k_segments[:, None, None, :])
  return mask


def _proj(c: LLMConfig, out_shape, names, name, bias=False) -> Projection:
  return Projection(out_shape, names, use_bias=bias, dtype=c.dtype, lora=c.lora, name=name)


class Attention(nn.Module):
  """GQA self-attention with RoPE over cache slots (see the module docstring)."""

  config: LLMConfig

  @nn.compact
  def __call__(self, y, positions, mask, cache, i, cache_index):
    c = self.config
    h, k, hd = c.num_heads, c.num_kv_heads, c.head_dim
    q = _proj(c, (h, hd), ("embed", "heads", "kv"), "q", c.qkv_bias)(y)
    kk = _proj(c, (k, hd), ("embed", "heads", "kv"), "k", c.qkv_bias)(y)
    v = _proj(c, (k, hd), ("embed", "heads", "kv"), "v", c.qkv_bias)(y)
    q, kk = rope(q, positions, c.rope_theta), rope(kk, positions, c.rope_theta)
    q = logical.constrain(q, "batch", "length", "act_heads", "kv")
    if cache is not None:
      at = (i, 0, cache_index, 0, 0)
      cache = {"k": jax.lax.dynamic_update_slice(cache["k"], kk[None].astype(cache["k"].dtype),
                                                 at),
               "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype),
                                                 at)}
      kk = jax.lax.dynamic_index_in_dim(cache["k"], i, 0, keepdims=False).astype(c.dtype)
      v = jax.lax.dynamic_index_in_dim(cache["v"], i, 0, keepdims=False).astype(c.dtype)
    o = jax.nn.dot_product_attention(q, kk, v, mask=mask)
    return _proj(c, (c.width,), ("heads", "kv", "embed"), "o")(o), cache


class SwiGLU(nn.Module):
  """``W_down (silu(W_gate y) * W_up y)`` (Shazeer 2020)."""

  config: LLMConfig

  @nn.compact
  def __call__(self, y):
    c = self.config
    gate = _proj(c, (c.mlp_dim,), ("embed", "mlp"), "gate")(y)
    up = _proj(c, (c.mlp_dim,), ("embed", "mlp"), "up")(y)
    hidden = logical.constrain(nn.silu(gate) * up, "batch", "length", "act_mlp")
    return _proj(c, (c.width,), ("mlp", "embed"), "down")(hidden)


class DecoderLayer(nn.Module):
  """One pre-norm layer; ``carry = (x, cache | None, layer index)`` so a scan carries the
  whole cache and writes this layer's new keys/values in place."""

  config: LLMConfig

  @nn.compact
  def __call__(self, carry, positions, mask, cache_index):
    x, cache, i = carry
    c = self.config
    y = RMSNorm(c.norm_eps, c.dtype, name="input_norm")(x)
    a, cache = Attention(c, name="attn")(y, positions, mask, cache, i, cache_index)
    x = logical.constrain(x + a, "batch", "length", "act_embed")
    y = RMSNorm(c.norm_eps, c.dtype, name="post_attn_norm")(x)
    x = logical.constrain(x + SwiGLU(c, name="mlp")(y), "batch", "length", "act_embed")
    return (x, cache, i + 1), None


def _scanned_layers(config: LLMConfig) -> type[nn.Module]:
  return nn.scan(remat_block(DecoderLayer, config.remat), variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=config.depth,
                 metadata_params={nn.PARTITION_NAME: "layers"})


class LLM(nn.Module):
  """The decoder. ``apply({'params': p}, input_ids)`` -> logits ``[B, T, vocab]`` (float32).

  Keyword inputs: ``inputs_embeds [B, T, width]`` instead of ids (an LVLM splices image
  features in), ``positions [B, T]`` (default: slots), ``attention_mask [B, S]`` (valid key
  slots; default all), ``segment_ids [B, T]`` (packing; 0 = padding), ``cache`` +
  ``cache_index`` (decoding: returns ``(logits, new_cache)``), ``return_hidden`` (the final
  normed hidden states instead of logits).
  """

  config: LLMConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.width,
                          embedding_init=logical.named(nn.initializers.normal(0.02), "vocab",
                                                       "embed"), name="embed")
    self.layers = _scanned_layers(c)(c, name="layers")
    self.final_norm = RMSNorm(c.norm_eps, c.dtype, name="final_norm")
    self.soft_prompts = [SoftPrompt(spec, c.width) for spec in c.soft_prompts]
    if not c.tie_embeddings:
      self.lm_head = Projection((c.vocab_size,), ("embed", "vocab"), dtype=c.dtype,
                                name="lm_head")

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings ``[B, T, width]``; placeholder ids outside the vocabulary (image,
    soft prompt) embed as id 0 until spliced; soft-prompt vectors are spliced in here."""
    c = self.config
    x = self.embed(splice.safe_ids(input_ids, c.vocab_size)).astype(c.dtype)
    for spec, prompt in zip(c.soft_prompts, self.soft_prompts, strict=True):
      init = (self.embed(jnp.asarray(spec.init_ids, jnp.int32)).astype(c.dtype)
              if spec.init_ids else None)
      x = splice.splice(x, input_ids, spec.id, prompt(init))
    return x

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.config.tie_embeddings:  # h E^T, contracting E's rows in place (no transpose copy)
      table = self.embed.embedding.astype(self.config.dtype)
      out = jax.lax.dot_general(hidden.astype(self.config.dtype), table,
                                (((hidden.ndim - 1,), (1,)), ((), ())))
    else:
      out = self.lm_head(hidden)
    return logical.constrain(out.astype(jnp.float32), "batch", "length", "act_vocab")

  def __call__(self, input_ids: jax.Array | None = None, *,
               inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None, segment_ids: jax.Array | None = None,
               cache: Cache | None = None, cache_index: jax.Array | int = 0,
               return_hidden: bool = False):
    x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    x = logical.constrain(x.astype(self.config.dtype), "batch", "length", "act_embed")
    b, t = x.shape[:2]
    if segment_ids is not None and cache is not None:
      raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache")
    num_keys = t if cache is None else cache["k"].shape[2]
    q_slots = cache_index + jnp.arange(t)
    if positions is None:
      positions = jnp.broadcast_to(q_slots, (b, t))
    if attention_mask is None:
      attention_mask = jnp.ones((b, num_keys), bool) if segment_ids is None else segment_ids > 0
    mask = attention_mask_of(q_slots, num_keys, attention_mask.astype(bool), segment_ids)
    (x, cache, _), _ = self.layers((x, cache, 0), positions, mask, cache_index)
    x = self.final_norm(x)
    out = x if return_hidden else self.logits(x)
    return out if cache is None else (out, cache)

  def init_cache(self, batch: int, length: int, dtype: Any = None) -> Cache:
    """Zeros ``{'k', 'v'}: [layers, batch, length, kv_heads, head_dim]`` (needs no params)."""
    c = self.config
    shape = (c.depth, batch, length, c.num_kv_heads, c.head_dim)
    return {"k": jnp.zeros(shape, dtype or c.dtype), "v": jnp.zeros(shape, dtype or c.dtype)}


def attention_mask_of(q_slots: jax.Array, num_keys: int, key_valid: jax.Array,
                      segment_ids: jax.Array | None) -> jax.Array:
  """:func:`attention_mask`, with packed segments when ``segment_ids`` is given."""
  if segment_ids is None:
    return attention_mask(q_slots, num_keys, key_valid)
  return attention_mask(q_slots, num_keys, key_valid, segment_ids, segment_ids)
