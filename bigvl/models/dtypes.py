"""Computation dtypes by name, for the models' ``from_config``: ``config.model.dtype``."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bigvl.config import Reader, check_choice

#: ``config.model.dtype`` names -> computation dtypes (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(cfg: Reader, default: Any) -> Any:
  """The dtype named by ``cfg.dtype``; ``default`` (the model's own field default) if unset."""
  name = cfg.get("dtype")
  if name is None:
    return default
  return DTYPES[check_choice(f"{cfg.path}.dtype", name, tuple(DTYPES))]
