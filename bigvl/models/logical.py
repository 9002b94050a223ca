"""Logical axis names on parameters (the MaxText way): a model says what each dimension *is*
(``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``, ``conv_out``, ``norm``, ``layers`` ...)
and ``config.logical_axis_rules`` (``bigvl.parallel.DEFAULT_LOGICAL_RULES``) says which mesh
axes shard it. Stacked layers (``nn.scan`` with ``metadata_params={nn.PARTITION_NAME:
'layers'}``) get their extra leading axis named too, so ``[L, in, out]`` is never read as
``[in, out]``.

These wrap flax's default initialisers without changing them: the same rng gives the same
values as the unannotated layers.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

Initializer = Callable[..., Any]
DEFAULT_KERNEL_INIT = nn.linear.default_kernel_init


def named(init: Initializer, *names: str | None) -> Initializer:
  """``init`` whose parameter carries the logical ``names`` (one per dimension)."""
  return nn.with_logical_partitioning(init, names)


def dense(features: int, names: tuple[str | None, str | None], *, name: str, dtype: Any = None,
          kernel_init: Initializer = DEFAULT_KERNEL_INIT, use_bias: bool = True,
          dot_general: Callable[..., Any] | None = None) -> nn.Dense:
  """``nn.Dense`` whose ``[in, out]`` kernel is named ``names`` and bias ``names[1:]``
  (``dot_general``: e.g. ``bigvl.models.matmul.dot_general``; default ``lax.dot_general``)."""
  extra = {} if dot_general is None else {"dot_general": dot_general}
  return nn.Dense(features, dtype=dtype, use_bias=use_bias, name=name, **extra,
                  kernel_init=named(kernel_init, *names),
                  bias_init=named(nn.initializers.zeros_init(), names[1]))


def layer_norm(eps: float = 1e-6, *, name: str, dtype: Any = None) -> nn.LayerNorm:
  """``nn.LayerNorm`` with ``norm``-named scale and bias and epsilon ``eps`` (default flax's):
  ``(x - mean) / sqrt(var + eps) * scale + bias``."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name,
                      scale_init=named(nn.initializers.ones_init(), "norm"),
                      bias_init=named(nn.initializers.zeros_init(), "norm"))


def batch_norm_inits() -> dict[str, Initializer]:
  """``scale_init`` / ``bias_init`` keyword arguments of ``nn.BatchNorm`` (``norm``-named)."""
  return {"scale_init": named(nn.initializers.ones_init(), "norm"),
          "bias_init": named(nn.initializers.zeros_init(), "norm")}


#: ``(rules, mesh)`` while a train step is traced (``bigvl.parallel.activation_rules``).
ACTIVATION_RULES: contextvars.ContextVar = contextvars.ContextVar("activation_rules",
                                                                  default=None)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Shards activation ``x`` by logical ``names`` (``'batch'``, ``'length'``, ``'act_embed'``
  ...) when a step binds rules and a mesh; otherwise (init, a bare ``apply``) returns ``x``."""
  bound = ACTIVATION_RULES.get()
  if bound is None:
    return x
  from bigvl.parallel import logical_to_spec  # noqa: PLC0415 (parallel imports this module)

  rules, mesh = bound
  spec = logical_to_spec(names, x.shape, rules, mesh, quiet=True)
  known = {name for name, _ in rules}  # a name no rule mentions: left to the compiler
  spec = jax.sharding.PartitionSpec(*(s if n in known else jax.sharding.PartitionSpec.UNCONSTRAINED
                                      for n, s in zip(names, spec, strict=True)))
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
