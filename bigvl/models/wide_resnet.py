"""WideResNet (Zagoruyko & Komodakis 2016, "Wide Residual Networks"), SSL-benchmark variant.

The variant of Oliver et al. 2018 ("Realistic Evaluation of Deep Semi-Supervised Learning
Algorithms") used by MixMatch, UDA and FixMatch: pre-activation residual blocks
(BN -> leaky ReLU(0.1) -> conv3x3 -> BN -> leaky ReLU -> conv3x3), batch-norm momentum 0.999,
a 16-channel stem, three groups of ``(depth - 4) / 6`` blocks with ``16k, 32k, 64k`` channels
(``k = width``; strides 1, 2, 2), a final BN + leaky ReLU, global average pooling and a dense
classifier. Convolutions have no bias. In the first block of the first group the shortcut
takes the pre-activated input ("activate_before_residual"), as in the FixMatch code.
WRN-28-2 with 10 classes has 1,467,610 parameters (the "1.5M" of those papers).

Inputs are NHWC floats of any spatial size (28x28x1, 8x8x1, 32x32x3, ...), already normalised
by the caller (e.g. ``(x / 255 - mean) / std``).

Batch statistics: ``nn.BatchNorm(axis_name=None)`` takes plain ``jnp.mean`` / ``jnp.var`` over
the batch (and spatial) axes. Under ``jax.jit`` with globally sharded ``jax.Array`` inputs
(GSPMD), those reductions are over the **global** batch: XLA inserts the cross-device
all-reduce itself, so the statistics and the ``batch_stats`` updates equal those of the
unsharded batch and no ``axis_name`` is needed. (An ``axis_name`` is only needed inside
``shard_map`` / ``pmap``, where each device sees its local shard.) Call
``model.apply(variables, x, train=True, mutable=["batch_stats"])`` in training.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical

Dtype = Any

# FixMatch: normal(stddev = sqrt(2 / (k * k * out_channels))), i.e. He-normal over fan-out;
# kernels [kh, kw, in, out] with logical axes (bigvl.models.logical).
conv_init = logical.named(nn.initializers.variance_scaling(2.0, "fan_out", "normal"), None, None,
                          "conv_in", "conv_out")
dense_init = nn.initializers.glorot_normal()


def leaky_relu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, negative_slope=0.1)


class WideResNetBlock(nn.Module):
  """Pre-activation residual block; ``x0 + conv(act(bn(conv(act(bn(x0))))))``."""

  filters: int
  strides: int = 1
  activate_before_residual: bool = False
  bn_momentum: float = 0.999
  bn_epsilon: float = 1e-3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x0: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, axis_name=None,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, **logical.batch_norm_inits())
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", kernel_init=conv_init,
                             dtype=self.dtype)
    x = leaky_relu(norm(name="bn1")(x0))
    if self.activate_before_residual:
      x0 = x
    y = conv(self.filters, (3, 3), strides=self.strides, name="conv1")(x)
    y = leaky_relu(norm(name="bn2")(y))
    y = conv(self.filters, (3, 3), name="conv2")(y)
    if x0.shape[-1] != self.filters or self.strides != 1:
      x0 = conv(self.filters, (1, 1), strides=self.strides, name="shortcut")(x0)
    return x0 + y


class WideResNet(nn.Module):
  """WRN-``depth``-``width`` classifier: ``__call__(x [B, H, W, C], train) -> logits [B, K]``.

  Attributes:
    depth: 6n + 4 (28 gives 4 blocks per group).
    width: the widening factor k (channels 16k, 32k, 64k).
    num_classes: K.
    bn_momentum: running-average decay of the batch statistics (0.999 in FixMatch).
    bn_epsilon: 1e-3 (TensorFlow's default, as in the FixMatch code).
    dropout_rate: dropout before the classifier (0 in FixMatch); needs a ``"dropout"`` rng.
    dtype: computation dtype (parameters stay float32); logits are returned in float32.
  """

  depth: int = 28
  width: int = 2
  num_classes: int = 10
  bn_momentum: float = 0.999
  bn_epsilon: float = 1e-3
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, return_features: bool = False) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}")
    blocks_per_group = (self.depth - 4) // 6
    block = functools.partial(WideResNetBlock, bn_momentum=self.bn_momentum,
                              bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, kernel_init=conv_init,
                dtype=self.dtype, name="stem")(x)
    for g in range(3):
      filters = 16 * self.width * 2**g
      for i in range(blocks_per_group):
        x = block(filters=filters, strides=2 if (g > 0 and i == 0) else 1,
                  activate_before_residual=(g == 0 and i == 0),
                  name=f"group{g}_block{i}")(x, train)
    x = nn.BatchNorm(use_running_average=not train, axis_name=None, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype, name="bn_final",
                     **logical.batch_norm_inits())(x)
    x = leaky_relu(x)
    return classifier_head(x, self.num_classes, self.dropout_rate, train, self.dtype,
                           return_features)


def classifier_head(x: jax.Array, num_classes: int, dropout_rate: float, train: bool,
                    dtype: Any, return_features: bool = False
                    ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Global average pooling -> dropout (train only) -> dense ``head`` -> float32 logits; with
  ``return_features`` also the pooled features ``[B, D]`` (float32, before dropout: what
  domain adaptation aligns).

  Called from inside a compact ``__call__``: the layers become the caller's submodules."""
  x = jnp.mean(x, axis=(1, 2))
  features = x
  if dropout_rate:
    x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  x = logical.dense(num_classes, ("conv_out", "classes"), kernel_init=dense_init, dtype=dtype,
                    name="head")(x)
  logits = x.astype(jnp.float32)
  return (logits, features.astype(jnp.float32)) if return_features else logits


def from_config(cfg, num_classes: int) -> WideResNet:
  """``config.model`` (``name='wide_resnet'``): ``depth``, ``width``, ``bn_momentum``,
  ``bn_epsilon``, ``dropout_rate``, ``dtype``; an unset key keeps :class:`WideResNet`'s
  default."""
  from bigvl.config import ConfigError, positive_int
  from bigvl.models import dtypes

  m = WideResNet
  depth = positive_int(cfg, "depth", m.depth)
  if (depth - 4) % 6:
    raise ConfigError(f"config.model.depth must be 6n + 4, got {depth}")
  return WideResNet(depth=depth, width=positive_int(cfg, "width", m.width),
                    num_classes=num_classes,
                    bn_momentum=float(cfg.typed("bn_momentum", float, m.bn_momentum)),
                    bn_epsilon=float(cfg.typed("bn_epsilon", float, m.bn_epsilon)),
                    dropout_rate=float(cfg.typed("dropout_rate", (float, int), m.dropout_rate)),
                    dtype=dtypes.from_config(cfg, m.dtype))
