"""LoRA: low-rank adapters on chosen projections (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

A projection ``y = x W (+ b)`` with ``W: [in..., out...]`` becomes

    y = x W (+ b) + (alpha / r) * dropout(x) A B,    A: [in..., r],  B: [r, out...]

with ``A ~ N(0, 1/in)`` (flax's lecun-normal) and ``B = 0``, so an adapted model starts as the
base model exactly. Which projections get adapters is a regex over the projection's module
path (``'layers/attn/q'``, ``'layers/mlp/down'``, ``'vision/encoder/block0/mlp/fc1'`` ...):
``config.model.lora.targets``. The train loop trains only what the config leaves trainable
(``lvlm_caption`` freezes everything but ``lora_a``/``lora_b`` in LoRA mode), and
:func:`merge` folds the adapters back into the kernels for export.

Why our own rather than qwix's LoRA provider: see docs/design.md ("LLM pieces: ours or a
library's").
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """``rank`` 0 = no adapters; ``targets``: regex (``re.search``) over projection paths."""

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = r"attn/(q|k|v|o)$"

  def applies(self, path: str) -> bool:
    return self.rank > 0 and re.search(self.targets, path) is not None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class Projection(nn.Module):
  """``x [..., in...] -> [..., out...]`` over the last ``len(in_shape)`` axes of ``x``; a LoRA
  adapter when ``lora.applies(path)``. ``names``: logical names of the kernel's axes (in axes
  then out axes). The adapter path is the module path without the stacked-layer prefix."""

  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]
  use_bias: bool = False
  dtype: Any = jnp.float32
  lora: LoraConfig | None = None
  kernel_init: Any = logical.DEFAULT_KERNEL_INIT

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n_out = len(self.out_shape)
    n_in = len(self.names) - n_out
    in_shape = x.shape[x.ndim - n_in:]
    in_names, out_names = self.names[:n_in], self.names[n_in:]
    fan_in = math.prod(in_shape)

    def init(key, shape, dtype=jnp.float32):  # lecun-normal over the flattened fan-in
      flat = self.kernel_init(key, (fan_in, math.prod(self.out_shape)), dtype)
      return flat.reshape(shape)

    kernel = self.param("kernel", logical.named(init, *self.names), in_shape + self.out_shape)
    y = _contract(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
    if self.use_bias:
      bias = self.param("bias", logical.named(nn.initializers.zeros_init(), *out_names),
                        self.out_shape)
      y = y + bias.astype(self.dtype)
    if self.lora is not None and self.lora.applies(module_path(self)):
      r = self.lora.rank
      # The rank axis is named too ("lora" -> fsdp by default): a factor whose other axes
      # go to ``tensor`` only (lora_b of q/k/v/gate/up, lora_a of o/down) still shards over
      # fsdp; where the other axis already takes fsdp, the rank axis stays whole.
      a = self.param("lora_a", logical.named(_flat_init(nn.initializers.lecun_normal(), fan_in),
                                             *in_names, "lora"), in_shape + (r,))
      b = self.param("lora_b", logical.named(nn.initializers.zeros_init(), "lora", *out_names),
                     (r,) + self.out_shape)
      h = x.astype(self.dtype)
      if self.lora.dropout > 0 and self.has_rng("dropout"):
        h = nn.Dropout(self.lora.dropout, deterministic=False)(h)
      h = _contract(h, a.astype(self.dtype), n_in)
      y = y + self.lora.scale * _contract(h, b.astype(self.dtype), 1)
    return y


def _flat_init(init: Any, fan_in: int) -> Any:
  """``init`` as if the first ``ndim-1`` axes were one input axis of size ``fan_in``."""
  def f(key, shape, dtype=jnp.float32):
    return init(key, (fan_in, shape[-1]), dtype).reshape(shape)
  return f


def _contract(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
  """Contracts the last ``n`` axes of ``x`` with the first ``n`` of ``w``."""
  return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))),
                                    ((), ())))


def module_path(module: nn.Module) -> str:
  """``'/'``-joined module path (as the parameter paths the loop uses)."""
  return "/".join(str(p) for p in module.scope.path)


def merge(params: Any, lora: LoraConfig) -> Any:
  """Params with every ``lora_a``/``lora_b`` pair folded into its ``kernel``:
  ``W + (alpha/r) A B``. Stacked (scanned) layers keep their leading axis."""
  if isinstance(params, dict) or hasattr(params, "items"):
    params = dict(params)
    if "lora_a" in params and "lora_b" in params:
      a, b = params.pop("lora_a"), params.pop("lora_b")
      w = params["kernel"]
      lead = a.ndim + b.ndim - 2 - w.ndim
      lead_shape = w.shape[:lead]
      a2 = a.reshape(lead_shape + (-1, a.shape[-1]))
      b2 = b.reshape(lead_shape + (b.shape[lead], -1))
      delta = jnp.matmul(a2.astype(jnp.float32), b2.astype(jnp.float32)) * lora.scale
      params["kernel"] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
    return {k: merge(v, lora) for k, v in params.items()}
  return params


def adapter_paths(paths: Sequence[str]) -> list[str]:
  """The LoRA parameters among ``paths``."""
  return [p for p in paths if p.rsplit("/", 1)[-1] in ("lora_a", "lora_b")]
