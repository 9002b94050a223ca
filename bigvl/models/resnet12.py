"""ResNet-12, the few-shot backbone (Lee et al. 2019 "MetaOptNet"; Tian et al. 2020 "RFS"),
as in the official SCL code (Ouali, Hudelot, Tami, ECML-PKDD 2021, "Spatial Contrastive
Learning for Few-Shot Classification", github.com/yassouali/SCL ``models/resnet.py``).

Four residual blocks with ``widths`` ``(64, 160, 320, 640)`` channels. A block is::

    y = lrelu(bn1(conv1(x)));  y = lrelu(bn2(conv2(y)));  y = bn3(conv3(y))   (3x3, no bias)
    y = lrelu(y + bn_s(conv_s(x)))                                            (1x1 shortcut)
    y = maxpool(y, pool)  ->  dropout (blocks 1, 2) / DropBlock (blocks 3, 4)

with leaky ReLU(0.1). The third conv's activation comes *after* the residual sum (as in the
official code, and MetaOptNet / RFS). The shortcut conv + BN exists when the channels change
or the block pools (always, with the defaults). Max-pooling has window = stride = ``pool``
and drops a ragged edge (PyTorch ``MaxPool2d(2)``): 84 -> 42 -> 21 -> 10 -> 5, so 84x84
inputs give a 5x5x640 map; 32x32 inputs give 2x2 with the default ``pool=(2, 2, 2, 2)``
and 4x4 with ``pool=(2, 2, 2, 1)``. The pooled features are the global average of the map;
the classifier (``num_classes > 0``) is a dense layer on them with no dropout before it.

Parameters: 12,424,320 in the backbone (convolutions and BN scales / biases; BN running
statistics are ``batch_stats``), + ``641 K`` in the classifier (640 K weights, K biases):
12,465,344 with 64 classes.

Regularisation, as the official ``create_model`` builds it (``drop_rate=0.1``): elementwise
dropout after blocks 1 and 2, DropBlock (Ghiasi et al. 2018) after the last two blocks with
``dropblock_size`` 5 (84x84 inputs; 2 for CIFAR-FS / FC100). DropBlock's rate is annealed
linearly from 0 to ``drop_rate`` over the first 40,000 forward passes in the official code
(a per-block counter); here the caller passes ``dropblock_scale`` (:func:`dropblock_scale`
of the step). Dropout and DropBlock act in training only and need a ``"dropout"`` rng.

Initialisation as the official code: He-normal over fan-out for convolutions, BN scale 1 and
bias 0, PyTorch's default ``nn.Linear`` init for the classifier
(``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for kernel and bias).

BatchNorm defaults are PyTorch's: momentum 0.1 (flax ``momentum=0.9``), epsilon 1e-5;
statistics over the global batch under jit (see ``bigvl.models.wide_resnet``).

SCL's projection heads, as in the official code:

* :class:`SpatialProjection` (``models/attention.py``, ``AttentionSimilarity``): query, key
  and value of every position of the feature map, each by its own two-layer MLP
  ``Linear(C, C, bias=False) -> ReLU -> Linear(C, out_dim, bias=False)`` applied per position
  (a 1x1 convolution); official ``C = 640``, ``out_dim = feat_dim = 80`` (the hidden layer is
  ``C`` wide; 80 is the output). The similarity of two maps is
  ``bigvl.losses.spatial_contrastive.spatial_similarity`` of their (q, k, v).
* :class:`GlobalProjection` (``models/contrast.py``, ``Projection``): the same MLP on the
  pooled features, ``[B, C] -> [B, out_dim]``, L2-normalised by the global term. The official
  runs (``scripts/run.sh``) train with the spatial term only: the head exists, unused.

1,382,400 parameters for the spatial head and 460,800 for the global one at ``C = 640``,
``out_dim = 80``; PyTorch's ``nn.Linear`` init, kernels named ``('embed', 'mlp')`` then
``('mlp', 'proj')``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigvl.models import logical
from bigvl.models.wide_resnet import conv_init, leaky_relu

Dtype = Any
Array = jax.Array

#: PyTorch's ``nn.Linear`` kernel init (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

#: Official DropBlock schedule: the rate reaches ``drop_rate`` after this many forward passes.
DROPBLOCK_WARMUP_STEPS = 40_000


def torch_linear_bias_init(fan_in: int) -> logical.Initializer:
  """PyTorch's ``nn.Linear`` bias init: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
  bound = 1.0 / fan_in**0.5

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dropblock_scale(step: int | Array, warmup_steps: int = DROPBLOCK_WARMUP_STEPS) -> Array:
  """Fraction of ``drop_rate`` DropBlock uses at 0-based train ``step``: ``min((step + 1) /
  warmup_steps, 1)``, the official schedule ``keep = max(1 - rate * n / 40000, 1 - rate)`` at
  the ``n``-th forward pass."""
  return jnp.minimum((jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps, 1.0)


def drop_block_mask(seeds: Array, block_size: int) -> Array:
  """Keep-mask ``[B, H, W, C]`` from block seeds ``[B, H - s + 1, W - s + 1, C]`` (0/1).

  A seed at ``(i, j)`` zeroes the ``s x s`` block ``[i, i + s) x [j, j + s)``, so every block
  lies inside the map (the official ``_compute_block_mask``): ``mask[p] = 1 - max_{d in
  [0, s)^2} seeds[p - d]``, a stride-1 max-pool of the seeds padded by ``s - 1`` each side.
  """
  pad = block_size - 1
  covered = nn.max_pool(seeds, (block_size, block_size), strides=(1, 1),
                        padding=((pad, pad), (pad, pad)))
  return 1.0 - covered


def drop_block(x: Array, key: Array, drop_prob: float | Array, block_size: int) -> Array:
  """DropBlock (Ghiasi et al. 2018, "DropBlock: A regularization method for convolutional
  networks") on ``x [B, H, W, C]``, as the official code: seeds ~ Bernoulli(gamma) per
  example and channel on the valid block positions, with
  ``gamma = drop_prob / s^2 * H W / ((H - s + 1)(W - s + 1))``, blocks zeroed and the rest
  rescaled by ``numel(mask) / sum(mask)`` (one factor over the whole batch). ``s`` is
  ``block_size`` clipped to the map."""
  _, h, w, _ = x.shape
  s = min(block_size, h, w)
  gamma = drop_prob / s**2 * (h * w) / ((h - s + 1) * (w - s + 1))
  seed_shape = (x.shape[0], h - s + 1, w - s + 1, x.shape[3])
  seeds = jax.random.bernoulli(key, jnp.clip(gamma, 0.0, 1.0), seed_shape).astype(jnp.float32)
  mask = drop_block_mask(seeds, s)
  scale = mask.size / jnp.maximum(jnp.sum(mask), 1.0)
  return x * (mask * scale).astype(x.dtype)


class ResNet12Block(nn.Module):
  """conv-BN-lrelu, conv-BN-lrelu, conv-BN, + (1x1 conv-BN shortcut), lrelu, max-pool, drop.

  Attributes:
    features: output channels.
    pool: max-pool window and stride (1: none).
    drop: ``'none'``, ``'dropout'`` or ``'dropblock'``.
    drop_rate: dropout probability / DropBlock's final drop probability.
    block_size: DropBlock's block size.
  """

  features: int
  pool: int = 2
  drop: str = "none"
  drop_rate: float = 0.0
  block_size: int = 5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, dropblock_scale: float | Array = 1.0) -> Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, axis_name=None,
                             momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                             dtype=self.dtype, **logical.batch_norm_inits())
    conv = functools.partial(nn.Conv, use_bias=False, padding="SAME", kernel_init=conv_init,
                             dtype=self.dtype)
    y = leaky_relu(norm(name="bn1")(conv(self.features, (3, 3), name="conv1")(x)))
    y = leaky_relu(norm(name="bn2")(conv(self.features, (3, 3), name="conv2")(y)))
    y = norm(name="bn3")(conv(self.features, (3, 3), name="conv3")(y))
    if x.shape[-1] != self.features or self.pool != 1:
      x = norm(name="shortcut_bn")(conv(self.features, (1, 1), name="shortcut")(x))
    y = leaky_relu(y + x)
    if self.pool > 1:
      y = nn.max_pool(y, (self.pool, self.pool), strides=(self.pool, self.pool),
                      padding="VALID")
    if train and self.drop_rate > 0:
      if self.drop == "dropout":
        y = nn.Dropout(self.drop_rate, deterministic=False)(y)
      elif self.drop == "dropblock":
        y = drop_block(y, self.make_rng("dropout"), self.drop_rate * dropblock_scale,
                       self.block_size)
    return y


class ResNet12(nn.Module):
  """``ResNet12(num_classes)(x [B, H, W, C] float, train, dropblock_scale=1.0) -> dict``:

  * ``feature_map``: ``[B, h, w, widths[-1]]``, the last block's output (after its max-pool;
    SCL's spatial features), float32;
  * ``features``: ``[B, widths[-1]]``, its global average (SCL's global / "avg_pool"
    features), float32;
  * ``logits``: ``[B, num_classes]`` float32 (absent when ``num_classes == 0``).

  ``batch_stats`` is mutable in training; dropout / DropBlock need a ``"dropout"`` rng then.

  Attributes:
    num_classes: K (64 for miniImageNet's base classes); 0: no classifier.
    widths: channels of the blocks (official ``(64, 160, 320, 640)``).
    pool: max-pool stride of each block (``(2, 2, 2, 1)`` keeps a 4x4 map on 32x32 inputs).
    drop_rate: dropout after the first blocks, DropBlock's final rate after the last two
      (official 0.1).
    dropblock_size: DropBlock's block size (official 5 for 84x84 inputs, 2 for 32x32).
    bn_momentum: running-average decay (0.9 = PyTorch's momentum 0.1).
    bn_epsilon: 1e-5 (PyTorch's).
    dtype: computation dtype (parameters float32); outputs are float32.
  """

  num_classes: int = 64
  widths: tuple[int, ...] = (64, 160, 320, 640)
  pool: tuple[int, ...] = (2, 2, 2, 2)
  drop_rate: float = 0.1
  dropblock_size: int = 5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool, dropblock_scale: float | Array = 1.0
               ) -> dict[str, Array]:
    if len(self.pool) != len(self.widths):
      raise ValueError(f"ResNet12: pool {self.pool} needs one stride per block of widths "
                       f"{self.widths}")
    x = x.astype(self.dtype)
    n = len(self.widths)
    for i, (width, pool) in enumerate(zip(self.widths, self.pool, strict=True)):
      x = ResNet12Block(width, pool=pool, drop="dropblock" if i >= n - 2 else "dropout",
                        drop_rate=self.drop_rate, block_size=self.dropblock_size,
                        bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                        dtype=self.dtype, name=f"block{i}")(x, train, dropblock_scale)
    feature_map = x.astype(jnp.float32)
    features = jnp.mean(feature_map, axis=(1, 2))
    out = {"feature_map": feature_map, "features": features}
    if self.num_classes:
      fan_in = features.shape[-1]
      head = nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                      kernel_init=logical.named(torch_linear_init, "conv_out", "classes"),
                      bias_init=logical.named(torch_linear_bias_init(fan_in), "classes"))
      out["logits"] = head(features.astype(self.dtype)).astype(jnp.float32)
    return out


class ProjectionMLP(nn.Module):
  """``relu(x W1) W2`` over the last axis, no biases: ``[..., C] -> [..., out_dim]``.

  Attributes:
    out_dim: output features.
    hidden_dim: hidden features; 0 = the input's ``C`` (official).
  """

  out_dim: int = 80
  hidden_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    hidden = self.hidden_dim or x.shape[-1]
    x = logical.dense(hidden, ("embed", "mlp"), kernel_init=torch_linear_init, use_bias=False,
                      dtype=self.dtype, name="dense1")(x.astype(self.dtype))
    x = nn.relu(x)
    x = logical.dense(self.out_dim, ("mlp", "proj"), kernel_init=torch_linear_init,
                      use_bias=False, dtype=self.dtype, name="dense2")(x)
    return x.astype(jnp.float32)


class SpatialProjection(nn.Module):
  """``SpatialProjection()(feature_map [B, h, w, C]) -> (q, k, v)``, each ``[B, h*w, out_dim]``
  float32 (positions in row-major order), by three separate :class:`ProjectionMLP` s named
  ``query``, ``key``, ``value``.

  Attributes:
    out_dim: q / k / v features (official ``feat_dim`` 80 = 640 / 8).
    hidden_dim: hidden width of the MLPs; 0 = ``C`` (official).
  """

  out_dim: int = 80
  hidden_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map: Array) -> tuple[Array, Array, Array]:
    b, h, w, c = feature_map.shape
    x = feature_map.reshape(b, h * w, c)
    return tuple(ProjectionMLP(self.out_dim, self.hidden_dim, self.dtype, name=name)(x)
                 for name in ("query", "key", "value"))


class GlobalProjection(nn.Module):
  """``GlobalProjection()(features [B, C]) -> [B, out_dim]`` float32: SCL's global contrastive
  head, one :class:`ProjectionMLP` (not normalised; the loss normalises).

  Attributes:
    out_dim: projection features (official ``feat_dim`` 80).
    hidden_dim: hidden width; 0 = ``C`` (official).
  """

  out_dim: int = 80
  hidden_dim: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Array) -> Array:
    return ProjectionMLP(self.out_dim, self.hidden_dim, self.dtype, name="mlp")(features)


def adaptive_max_pool(x: Array, bins: int) -> Array:
  """``[B, h, w, C] -> [B, bins, bins, C]``: PyTorch's ``AdaptiveMaxPool2d(bins)`` (its bin
  edges, ``bigvl.models.segmentation.adaptive_bins``); SCL's evaluation pools the final map to
  2x2 before flattening it into the spatial features."""
  from bigvl.models.segmentation import adaptive_bins

  rows = [jnp.max(x[:, lo:hi], axis=1) for lo, hi in adaptive_bins(x.shape[1], bins)]
  x = jnp.stack(rows, axis=1)  # [B, bins, w, C]
  cols = [jnp.max(x[:, :, lo:hi], axis=2) for lo, hi in adaptive_bins(x.shape[2], bins)]
  return jnp.stack(cols, axis=2)


def from_config(cfg, num_classes: int) -> ResNet12:
  """``config.model`` (``name='resnet12'``): ``widths``, ``pool`` (tuples/lists of positive
  ints, one per block), ``drop_rate``, ``dropblock_size``, ``bn_momentum``, ``bn_epsilon``,
  ``dtype``; an unset key keeps :class:`ResNet12`'s default."""
  from bigvl.config import ConfigError, positive_int
  from bigvl.models import dtypes

  m = ResNet12
  widths = cfg.typed("widths", (tuple, list), m.widths)
  pool = cfg.typed("pool", (tuple, list), m.pool)
  for name, value in (("widths", widths), ("pool", pool)):
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                            for v in value):
      raise ConfigError(f"{cfg.path}.{name} must be a non-empty tuple of positive ints, "
                        f"got {value!r}")
  if len(pool) != len(widths):
    raise ConfigError(f"{cfg.path}.pool must have one stride per block ({len(widths)}), "
                      f"got {tuple(pool)}")
  drop_rate = float(cfg.typed("drop_rate", (float, int), m.drop_rate))
  if not 0.0 <= drop_rate < 1.0:
    raise ConfigError(f"{cfg.path}.drop_rate must be in [0, 1), got {drop_rate}")
  return ResNet12(num_classes=num_classes, widths=tuple(widths), pool=tuple(pool),
                  drop_rate=drop_rate,
                  dropblock_size=positive_int(cfg, "dropblock_size", m.dropblock_size),
                  bn_momentum=float(cfg.typed("bn_momentum", float, m.bn_momentum)),
                  bn_epsilon=float(cfg.typed("bn_epsilon", float, m.bn_epsilon)),
                  dtype=dtypes.from_config(cfg, m.dtype))
