"""Two-tower image-text model (CLIP / SigLIP): ViT + text transformer, each projected to a
shared ``embed_dim`` and L2-normalised, plus the learnable temperature ``t'`` (``t = exp(t')``)
and bias ``b``. SigLIP (Zhai et al. 2023) initialises ``t' = log 10`` and ``b = -10``."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.text import TextTransformer
from bigvl.models.transformer import remat_name
from bigvl.models.vit import ViT


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  return x / jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  image: dict
  text: dict
  embed_dim: int = 128
  temperature_init: float = 10.0
  bias_init: float = -10.0
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.img = ViT(**self.image, dtype=self.dtype, name="img")
    self.txt = TextTransformer(**self.text, dtype=self.dtype, name="txt")
    self.img_proj = logical.dense(self.embed_dim, ("embed", "proj"), name="img_proj")
    self.txt_proj = logical.dense(self.embed_dim, ("embed", "proj"), name="txt_proj")
    self.t_prime = self.param("t_prime", nn.initializers.constant(
        math.log(self.temperature_init)), ())
    self.b = self.param("b", nn.initializers.constant(self.bias_init), ())

  def embed_images(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] -> [B, embed_dim] L2-normalised (float32)."""
    return l2_normalize(self.img_proj(self.img(images)[0]).astype(jnp.float32))

  def embed_texts(self, tokens: jax.Array) -> jax.Array:
    """int [B, L] -> [B, embed_dim] L2-normalised (float32)."""
    return l2_normalize(self.txt_proj(self.txt(tokens)[0]).astype(jnp.float32))

  def __call__(self, images: jax.Array, tokens: jax.Array):
    """Returns ``(zimg [B, E], ztxt [M, E], t = exp(t'), b)``."""
    return (self.embed_images(images), self.embed_texts(tokens), jnp.exp(self.t_prime),
            self.b)


def from_config(cfg, *, vocab_size: int, max_len: int) -> TwoTower:
  """``config.model``: ``image`` (ViT fields), ``text`` (TextTransformer fields), ``embed_dim``,
  ``temperature_init``, ``bias_init``, ``dtype``; an unset key keeps :class:`TwoTower`'s
  default."""
  from bigvl.config import ConfigError
  from bigvl.models import dtypes

  m = TwoTower
  image, text = cfg.image.to_dict(), cfg.text.to_dict()
  # ``text.vocab_size`` may reserve a larger table than the tokenizer needs (a public
  # model's, a benchmark's); it is rounded up so that it shards evenly over any mesh axis.
  table = text.get("vocab_size", vocab_size)
  if not isinstance(table, int) or table < vocab_size:
    raise ConfigError(f"config.model.text.vocab_size={table!r} must be an int >= the "
                      f"tokenizer's {vocab_size} tokens")
  text.update(vocab_size=-(-table // 64) * 64, max_len=max_len)
  for name, fields, cls in (("image", image, ViT), ("text", text, TextTransformer)):
    unknown = set(fields) - set(cls.__dataclass_fields__) - {"parent", "name"}
    if unknown:
      raise ConfigError(f"config.model.{name} has unknown fields {sorted(unknown)}")
    try:
      remat_name(fields.get("remat", False))
    except ValueError as e:
      raise ConfigError(f"config.model.{name}.{e}") from None
  return TwoTower(image=image, text=text, embed_dim=cfg.typed("embed_dim", int, m.embed_dim),
                  temperature_init=float(cfg.typed("temperature_init", (float, int),
                                                   m.temperature_init)),
                  bias_init=float(cfg.typed("bias_init", (float, int), m.bias_init)),
                  dtype=dtypes.from_config(cfg, m.dtype))
