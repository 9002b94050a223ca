"""A small batch-normalised CNN for quick semi-supervised runs on MNIST / 8x8 digits.

Same interface as ``bigvl.models.wide_resnet.WideResNet``:
``SmallCNN(num_classes=10)(x [B, H, W, C] float, train: bool) -> logits [B, K]`` (float32),
``batch_stats`` collection mutable in training; ``return_features=True`` also returns the
pooled features ``[B, D]`` (domain adaptation aligns them). Three 3x3 conv -> BN -> leaky
ReLU(0.1) stages (``width, 2 width, 4 width`` channels, strides 1, 2, 2), global average
pooling, dense head, so any input size works (28x28x1, 8x8x1, 32x32x3). ``width=32``, 10
classes: 94,186 parameters on 1-channel inputs (94,762 on 3 channels). BN statistics are over
the global batch under jit with sharded arrays (see ``wide_resnet``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.wide_resnet import classifier_head, conv_init, leaky_relu

Dtype = Any


class SmallCNN(nn.Module):
  """conv(w) -> conv(2w, /2) -> conv(4w, /2) [...], each conv -> BN -> leaky ReLU; pool; dense.

  Attributes:
    num_classes: K.
    width: channels of the first stage (32).
    stages: number of conv stages (3); stage ``i`` has ``width * 2**i`` channels and stride 2
      for ``i > 0``. A 4th stage widens the receptive field (9 -> 17 pixels at 28x28) cheaply.
    bn_momentum: running-average decay (0.99: short runs need faster-moving statistics).
    bn_epsilon: 1e-3.
    dropout_rate: dropout before the classifier; needs a ``"dropout"`` rng when > 0.
    stage_dropout: dropout after every downsampling stage but the last (stages ``1 ..
      stages - 2``), as Laine & Aila 2017 and Tarvainen & Valpola 2017 put dropout 0.5 after
      each max-pooling of their ConvNet (our stride-2 stages stand in for its pooling); 0: off.
    dtype: computation dtype; logits are returned in float32.
  """

  num_classes: int = 10
  width: int = 32
  stages: int = 3
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dropout_rate: float = 0.0
  stage_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, return_features: bool = False) -> jax.Array:
    x = x.astype(self.dtype)
    for i in range(self.stages):
      stride = 1 if i == 0 else 2
      x = nn.Conv(self.width * 2**i, (3, 3), strides=stride, padding="SAME", use_bias=False,
                  kernel_init=conv_init, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, axis_name=None,
                       momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
                       name=f"bn{i}", **logical.batch_norm_inits())(x)
      x = leaky_relu(x)
      if self.stage_dropout and 1 <= i < self.stages - 1:
        x = nn.Dropout(self.stage_dropout, deterministic=not train)(x)
    return classifier_head(x, self.num_classes, self.dropout_rate, train, self.dtype,
                           return_features)


def from_config(cfg, num_classes: int) -> SmallCNN:
  """``config.model`` (``name='small_cnn'``): ``width``, ``stages``, ``bn_momentum``,
  ``bn_epsilon``, ``dropout_rate``, ``stage_dropout``, ``dtype``; an unset key keeps
  :class:`SmallCNN`'s default; a dropout rate outside [0, 1) is a ConfigError."""
  from bigvl.config import ConfigError, positive_int
  from bigvl.models import dtypes

  m = SmallCNN
  rates = {}
  for name in ("dropout_rate", "stage_dropout"):
    rates[name] = float(cfg.typed(name, (float, int), getattr(m, name)))
    if not 0 <= rates[name] < 1:
      raise ConfigError(f"{cfg.path}.{name} must be in [0, 1), got {rates[name]}")
  return SmallCNN(num_classes=num_classes, width=positive_int(cfg, "width", m.width),
                  stages=positive_int(cfg, "stages", m.stages),
                  bn_momentum=float(cfg.typed("bn_momentum", float, m.bn_momentum)),
                  bn_epsilon=float(cfg.typed("bn_epsilon", float, m.bn_epsilon)),
                  dtype=dtypes.from_config(cfg, m.dtype), **rates)
