"""Fast autoregressive generation with a preallocated KV cache: two compiled programs.

* **prefill** ``(variables, prompt [B, P], mask [B, P], inputs) -> (first token, cache)``:
  one forward over the left-padded prompts writes cache slots ``0..P-1`` and samples the
  first new token.
* **decode** ``(variables, cache, token, ...) -> new tokens [B, max_new_tokens]``: a
  ``lax.scan`` of single-token steps, each writing slot ``P + t`` of the cache in place.

Prompts of different lengths share a batch: row ``b`` is left-padded by ``P - len_b``, its
RoPE positions are ``0..len_b-1`` and padding slots are masked as keys, so every row decodes
as it would alone. ``P`` is rounded up to a multiple of :data:`PROMPT_BUCKET`; each program
compiles once per ``(B, P, max_new_tokens)`` and sampling setting, never per token
(:func:`compilations` counts them).

Sampling (``temperature > 0``): logits / temperature, then top-k (keep the ``k`` largest),
then top-p (nucleus, Holtzman et al. 2020: keep the smallest set of most likely tokens whose
probability mass reaches ``p``; the most likely token always stays), then a categorical draw.
``temperature == 0`` is greedy (argmax). After ``eos_id`` a row emits ``pad_id``.

Models: anything with ``init_cache(batch, length)`` and a call
``apply(variables, ids, positions=, attention_mask=, cache=, cache_index=, **inputs)``
returning ``(logits, cache)`` -- :class:`bigvl.models.llm.LLM` and
:class:`bigvl.models.lvlm.LVLM` (``inputs={'images': ...}`` reach the prefill only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: prompt lengths are padded up to a multiple of this (one compile per bucket).
PROMPT_BUCKET = 16


def sample_logits(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None) -> jax.Array:
  """``[B, V]`` float logits -> ``[B]`` int32 token ids (see the module docstring)."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p is not None:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, neg, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, bucket: int = PROMPT_BUCKET
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token-id lists -> ``(ids [B, P], mask [B, P])``, right-aligned, ``P`` a bucket multiple."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate needs at least one prompt and no empty prompt")
  longest = max(len(p) for p in prompts)
  width = -(-longest // bucket) * bucket
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = np.asarray(p, np.int32)
    mask[i, width - len(p):] = True
  return ids, mask


def prefill(model: Any, variables: Any, ids: jax.Array, mask: jax.Array, rng: jax.Array,
            max_new_tokens: int, sampling: tuple, inputs: Mapping[str, Any] | None = None):
  """Pure prefill: ``(first token [B], cache, key_valid [B, S], next position [B])``."""
  b, p = ids.shape
  cache = model.init_cache(b, p + max_new_tokens)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  key_valid = jnp.concatenate([mask, jnp.ones((b, max_new_tokens), bool)], axis=1)
  logits, cache = model.apply(variables, ids, positions=positions, attention_mask=key_valid,
                              cache=cache, cache_index=0, **(inputs or {}))
  first = sample_logits(logits[:, -1], rng, *sampling)
  return first, cache, key_valid, positions[:, -1] + 1


def decode(model: Any, variables: Any, cache: Any, first: jax.Array, key_valid: jax.Array,
           next_pos: jax.Array, rng: jax.Array, prompt_len: int, max_new_tokens: int,
           sampling: tuple, eos_id: int | None, pad_id: int) -> jax.Array:
  """Pure decode loop: ``[B, max_new_tokens]`` ids, the first being ``first``."""
  def emit(tok, done):
    return jnp.where(done, pad_id, tok), done | (tok == eos_id if eos_id is not None else False)

  def step(carry, t):
    cache, tok, done, rng = carry
    rng, key = jax.random.split(rng)
    logits, cache = model.apply(variables, tok[:, None], positions=(next_pos + t)[:, None],
                                attention_mask=key_valid, cache=cache,
                                cache_index=prompt_len + t)
    new = sample_logits(logits[:, -1], key, *sampling)
    out, done = emit(new, done)
    return (cache, new, done, rng), out

  first_out, done = emit(first, jnp.zeros(first.shape, bool))
  if max_new_tokens == 1:
    return first_out[:, None]
  _, rest = jax.lax.scan(step, (cache, first, done, rng), jnp.arange(max_new_tokens - 1))
  return jnp.concatenate([first_out[:, None], rest.T], axis=1)


def generate_ids(model: Any, variables: Any, ids: jax.Array, mask: jax.Array,
                 max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, rng: jax.Array | None = None,
                 eos_id: int | None = None, pad_id: int = 0,
                 inputs: Mapping[str, Any] | None = None) -> jax.Array:
  """Prefill + decode as one pure function (for use inside a jitted prediction function):
  left-padded ``ids``/``mask [B, P]`` -> new ids ``[B, max_new_tokens]``."""
  sampling = (temperature, top_k, top_p)
  rng = jax.random.key(0) if rng is None else rng
  k1, k2 = jax.random.split(rng)
  first, cache, key_valid, next_pos = prefill(model, variables, ids, mask, k1, max_new_tokens,
                                              sampling, inputs)
  return decode(model, variables, cache, first, key_valid, next_pos, k2, ids.shape[1],
                max_new_tokens, sampling, eos_id, pad_id)


def _programs(model: Any, max_new_tokens: int, sampling: tuple, eos_id: int | None,
              pad_id: int):
  """The jitted prefill and decode programs of one model and setting (cached)."""
  pre = jax.jit(lambda v, ids, mask, rng, inputs: prefill(
      model, v, ids, mask, rng, max_new_tokens, sampling, inputs))
  dec = jax.jit(lambda v, cache, first, kv, pos, rng: decode(
      model, v, cache, first, kv, pos, rng, kv.shape[1] - max_new_tokens, max_new_tokens,
      sampling, eos_id, pad_id))
  return pre, dec


#: ``(model, max_new_tokens, sampling, eos_id, pad_id) -> (prefill, decode)`` jitted programs.
_PROGRAMS: dict[Any, tuple] = {}


def compilations() -> int:
  """How many prefill/decode executables :func:`generate` has compiled in this process."""
  return sum(f._cache_size() for pair in _PROGRAMS.values() for f in pair)


def generate(model: Any, params: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             rng: jax.Array | None = None, *, eos_id: int | None = None, pad_id: int = 0,
             inputs: Mapping[str, Any] | None = None) -> np.ndarray:
  """New token ids ``[B, max_new_tokens]`` for ``prompts`` (token-id lists, any lengths).

  ``params``: the model's parameter tree; ``inputs``: extra prefill inputs (an LVLM's
  ``{'images': [B, ...]}``). Greedy by default; see the module docstring for sampling."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (
      top_k is not None and top_k < 1):
    raise ValueError(f"bad sampling setting temperature={temperature} top_k={top_k} "
                     f"top_p={top_p}")
  if temperature > 0 and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng")
  sampling = (float(temperature), top_k, top_p)
  key = (model, max_new_tokens, sampling, eos_id, pad_id)
  if key not in _PROGRAMS:
    _PROGRAMS[key] = _programs(*key)
  pre, dec = _PROGRAMS[key]
  ids, mask = left_pad(prompts, pad_id)
  rng = jax.random.key(0) if rng is None else rng
  k1, k2 = jax.random.split(rng)
  variables = {"params": params}
  first, cache, key_valid, next_pos = pre(variables, ids, mask, k1, dict(inputs or {}))
  return np.asarray(dec(variables, cache, first, key_valid, next_pos, k2))
