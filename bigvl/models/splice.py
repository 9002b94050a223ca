"""Placeholder splicing: learned or computed vectors take the places of placeholder tokens.

An LVLM's prompt holds ``N`` copies of the ``<image>`` token id per image (as LLaVA's processor
expands it); soft prompts hold ``K`` copies of a ``<prompt>`` id. :func:`splice` replaces, row by
row and in order, the embeddings at those positions with the given vectors:

    out[b, t] = values[b, rank_b(t)]   if ids[b, t] == placeholder   else embeds[b, t]

with ``rank_b(t)`` the number of placeholders before ``t`` in row ``b``. Rows with fewer
placeholders than ``values`` has vectors use the first ones; templates (data) decide where the
placeholders go.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def splice(embeds: jax.Array, ids: jax.Array, placeholder: int, values: jax.Array) -> jax.Array:
  """embeds ``[B, T, D]``, ids ``[B, T]``, values ``[B, N, D]`` (or ``[N, D]``, shared)."""
  if values.ndim == 2:
    values = jnp.broadcast_to(values, (embeds.shape[0],) + values.shape)
  hit = ids == placeholder
  rank = jnp.clip(jnp.cumsum(hit, axis=1) - 1, 0, values.shape[1] - 1)
  picked = jnp.take_along_axis(values.astype(embeds.dtype), rank[..., None], axis=1)
  return jnp.where(hit[..., None], picked, embeds)


def safe_ids(ids: jax.Array, vocab_size: int) -> jax.Array:
  """``ids`` with out-of-vocabulary placeholders mapped to 0 before an embedding lookup."""
  return jnp.where((ids >= 0) & (ids < vocab_size), ids, 0)
