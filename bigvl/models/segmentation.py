"""Semantic segmentation networks: a dilated ResNet encoder with a PSP context module, and
pixel-shuffle upsampling decoders (one main decoder plus the auxiliary decoders of
Cross-Consistency Training).

``SegmentationNet(num_classes, num_aux=K)``:

* ``encode(x [B, H, W, C], train) -> z [B, H/s, W/s, D]``: the backbone at output stride
  ``s`` (``output_stride``; later stages trade stride for dilation, as DeepLab / PSPNet do)
  followed by the pyramid pooling module (Zhao et al. 2017, "Pyramid Scene Parsing
  Network"): for each bin count ``b`` in ``psp_bins``, adaptive average pooling to ``b x b``,
  1x1 conv -> BN -> ReLU, bilinear upsampling back; concatenated with the input; 3x3 conv
  -> BN -> ReLU.
* ``decode(z) -> logits [B, H, W, num_classes]`` (float32) with the main decoder, and
  ``decode_aux(z, k)`` with auxiliary decoder ``k``. A decoder is CCT's upsampling head
  (Ouali et al. 2020, official code's ``upsample``): a 1x1 conv to ``num_classes`` channels,
  then ``log2(s)`` times [1x1 conv to ``4 x num_classes``, pixel shuffle x2], ReLU between
  them (not after the last: the logits are unconstrained). The sub-pixel convs start as
  nearest-neighbour upsampling (ICNR init, Aitken et al. 2017): the four sub-pixel kernels
  are equal at init.
* ``__call__(x, train) = decode(encode(x, train))``; at init every decoder is created.

Backbones (``block``): ``'basic'`` (ResNet-18/34 blocks) or ``'bottleneck'`` (ResNet-50/101,
expansion 4), post-activation (ResNet v1, the layout of the public ImageNet checkpoints);
``stem='imagenet'`` is the 7x7/2 conv + 3x3/2 max-pool stem (stride 4), ``'small'`` a 3x3/1
conv for tiny images (stride 1). Stage ``i > 0`` has nominal stride 2; once the running stride
reaches ``output_stride`` a stage keeps the resolution and multiplies its dilation by 2
instead. CCT's full-size model: bottleneck ``(3, 4, 6, 3)``, imagenet stem, output stride 8,
bins ``(1, 2, 3, 6)``.

Batch norm over the global batch under jit (see ``wide_resnet``); call with
``mutable=['batch_stats']`` in training.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigvl.models import logical
from bigvl.models.wide_resnet import conv_init

Dtype = Any
BLOCKS = ("basic", "bottleneck")
STEMS = ("imagenet", "small")


def _norm(train: bool, momentum: float, dtype: Dtype, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, axis_name=None, momentum=momentum,
                      epsilon=1e-5, dtype=dtype, name=name, **logical.batch_norm_inits())


def _conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
          dilation: int = 1, use_bias: bool = False,
          kernel_init: Any = conv_init) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, kernel_dilation=dilation,
                 padding="SAME", use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                 name=name, **({"bias_init": logical.named(nn.initializers.zeros_init(),
                                                           "conv_out")} if use_bias else {}))


class ResidualBlock(nn.Module):
  """``relu(shortcut(x) + F(x))``; ``F`` = 3x3 -> 3x3 (basic) or 1x1 -> 3x3 -> 1x1 with 4x
  expansion (bottleneck); the 3x3 convs carry the stride and the dilation."""

  width: int
  block: str = "basic"
  stride: int = 1
  dilation: int = 1
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(_norm, train, self.bn_momentum, self.dtype)
    conv = functools.partial(_conv, dtype=self.dtype)
    if self.block == "basic":
      out_ch = self.width
      y = nn.relu(norm("bn1")(conv(self.width, 3, name="conv1", stride=self.stride,
                                   dilation=self.dilation)(x)))
      y = norm("bn2")(conv(self.width, 3, name="conv2", dilation=self.dilation)(y))
    else:
      out_ch = 4 * self.width
      y = nn.relu(norm("bn1")(conv(self.width, 1, name="conv1")(x)))
      y = nn.relu(norm("bn2")(conv(self.width, 3, name="conv2", stride=self.stride,
                                   dilation=self.dilation)(y)))
      y = norm("bn3")(conv(out_ch, 1, name="conv3")(y))
    if x.shape[-1] != out_ch or self.stride != 1:
      x = norm("bn_shortcut")(conv(out_ch, 1, name="shortcut", stride=self.stride)(x))
    return nn.relu(x + y)


def stage_geometry(stem_stride: int, num_stages: int, output_stride: int
                   ) -> list[tuple[int, int]]:
  """``[(stride, dilation)]`` of each stage's first block: nominal stride 2 for every stage
  after the first; a stage that would exceed ``output_stride`` keeps stride 1 and doubles the
  dilation instead (every later block of the stage uses that dilation too)."""
  out, running, dilation = [], stem_stride, 1
  for i in range(num_stages):
    stride = 1 if i == 0 else 2
    if running * stride > output_stride:
      dilation *= stride
      stride = 1
    running *= stride
    out.append((stride, dilation))
  return out


def adaptive_bins(size: int, bins: int) -> list[tuple[int, int]]:
  """PyTorch's adaptive pooling bins: bin ``i`` covers ``[floor(i size / bins),
  ceil((i + 1) size / bins))``."""
  return [((i * size) // bins, -((-(i + 1) * size) // bins)) for i in range(bins)]


def adaptive_pool_matrix(size: int, bins: int) -> np.ndarray:
  """``[bins, size]`` averaging weights of adaptive average pooling (:func:`adaptive_bins`)."""
  m = np.zeros((bins, size), np.float32)
  for i, (lo, hi) in enumerate(adaptive_bins(size, bins)):
    m[i, lo:hi] = 1.0 / (hi - lo)
  return m


class PyramidPooling(nn.Module):
  """PSP module (Zhao et al. 2017): ``conv3x3([x, up(conv1x1(pool_b(x))) for b in bins])``."""

  bins: tuple[int, ...] = (1, 2, 3, 6)
  features: int = 512
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    _, h, w, c = x.shape
    branch_ch = max(c // len(self.bins), 1)
    outs = [x]
    for b in self.bins:
      ph, pw = adaptive_pool_matrix(h, b), adaptive_pool_matrix(w, b)
      y = jnp.einsum("ih,bhwc,jw->bijc", ph.astype(x.dtype), x, pw.astype(x.dtype))
      y = _conv(branch_ch, 1, self.dtype, f"pool{b}_conv")(y)
      y = nn.relu(_norm(train, self.bn_momentum, self.dtype, f"pool{b}_bn")(y))
      outs.append(jax.image.resize(y, (y.shape[0], h, w, branch_ch), "bilinear"))
    y = _conv(self.features, 3, self.dtype, "bottleneck")(jnp.concatenate(outs, axis=-1))
    return nn.relu(_norm(train, self.bn_momentum, self.dtype, "bottleneck_bn")(y))


class Encoder(nn.Module):
  """Dilated ResNet + PSP: ``x [B, H, W, C] -> z [B, H / output_stride, W / output_stride,
  psp_features]``."""

  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  block: str = "bottleneck"
  width: int = 64
  stem: str = "imagenet"
  output_stride: int = 8
  psp_bins: tuple[int, ...] = (1, 2, 3, 6)
  psp_features: int = 512
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = _conv(self.width, 7, self.dtype, "stem_conv", stride=2)(x)
      x = nn.relu(_norm(train, self.bn_momentum, self.dtype, "stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      stem_stride = 4
    else:
      x = _conv(self.width, 3, self.dtype, "stem_conv")(x)
      x = nn.relu(_norm(train, self.bn_momentum, self.dtype, "stem_bn")(x))
      stem_stride = 1
    geometry = stage_geometry(stem_stride, len(self.stage_sizes), self.output_stride)
    for s, (n, (stride, dilation)) in enumerate(zip(self.stage_sizes, geometry, strict=True)):
      for i in range(n):
        x = ResidualBlock(self.width * 2**s, self.block, stride if i == 0 else 1, dilation,
                          self.bn_momentum, self.dtype, name=f"stage{s}_block{i}")(x, train)
    return PyramidPooling(self.psp_bins, self.psp_features, self.bn_momentum, self.dtype,
                          name="psp")(x, train)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """Depth to space: ``[B, h, w, C r^2] -> [B, h r, w r, C]``, channel ``c r^2 + i r + j`` to
  sub-pixel ``(i, j)`` of channel ``c`` (PyTorch's ``PixelShuffle`` order)."""
  b, h, w, cr = x.shape
  c = cr // (r * r)
  x = x.reshape(b, h, w, c, r, r)
  return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c)


def icnr_init(r: int = 2) -> Any:
  """ICNR (Aitken et al. 2017): a ``[.., C_in, C r^2]`` kernel whose ``r^2`` sub-pixel
  kernels of each channel are equal, so conv + pixel shuffle starts as nearest-neighbour
  upsampling of a ``C``-channel conv (He-normal)."""
  base = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

  def init(key, shape, dtype=jnp.float32):
    *lead, c_in, c_out = shape
    k = base(key, (*lead, c_in, c_out // (r * r)), dtype)
    return jnp.repeat(k, r * r, axis=-1)
  return logical.named(init, None, None, "conv_in", "conv_out")


class UpsamplingDecoder(nn.Module):
  """CCT's decoder (module docstring): ``z -> logits [B, h s, w s, num_classes]``.

  ``channels`` (default 0: ``num_classes``, the official decoder) widens the sub-pixel path:
  the 1x1 projection and the pixel-shuffle convs use ``channels``, and a last 1x1 conv maps to
  the classes (after a ReLU), so a few classes do not bottleneck the upsampling."""

  num_classes: int
  upscale: int = 8
  channels: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    steps = int(round(math.log2(self.upscale)))
    if 2**steps != self.upscale:
      raise ValueError(f"upscale must be a power of 2, got {self.upscale}")
    width = self.channels or self.num_classes
    x = _conv(width, 1, self.dtype, "proj")(z)
    for i in range(steps):
      x = nn.relu(x)
      x = _conv(4 * width, 1, self.dtype, f"shuffle{i}", use_bias=True,
                kernel_init=icnr_init(2))(x)
      x = pixel_shuffle(x, 2)
    if width != self.num_classes:
      x = _conv(self.num_classes, 1, self.dtype, "classify", use_bias=True)(nn.relu(x))
    return x.astype(jnp.float32)


class SegmentationNet(nn.Module):
  """Encoder + main decoder + ``num_aux`` auxiliary decoders (module docstring)."""

  num_classes: int
  num_aux: int = 0
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  block: str = "bottleneck"
  width: int = 64
  stem: str = "imagenet"
  output_stride: int = 8
  psp_bins: tuple[int, ...] = (1, 2, 3, 6)
  psp_features: int = 512
  decoder_channels: int = 0
  bn_momentum: float = 0.9
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encoder = Encoder(self.stage_sizes, self.block, self.width, self.stem,
                           self.output_stride, self.psp_bins, self.psp_features,
                           self.bn_momentum, self.dtype)
    self.main = UpsamplingDecoder(self.num_classes, self.output_stride,
                                  self.decoder_channels, self.dtype)
    self.aux = [UpsamplingDecoder(self.num_classes, self.output_stride,
                                  self.decoder_channels, self.dtype, name=f"aux{k}")
                for k in range(self.num_aux)]

  def encode(self, x: jax.Array, train: bool) -> jax.Array:
    return self.encoder(x, train)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.main(z)

  def decode_aux(self, z: jax.Array, k: int) -> jax.Array:
    return self.aux[k](z)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    z = self.encode(x, train)
    if self.is_initializing():  # every decoder gets its parameters
      for dec in self.aux:
        dec(z)
    return self.decode(z)


def from_config(cfg, num_classes: int, num_aux: int = 0) -> SegmentationNet:
  """``config.model`` (``name='segmentation'``): ``stage_sizes``, ``block``
  (``basic`` | ``bottleneck``), ``width``, ``stem`` (``imagenet`` | ``small``),
  ``output_stride`` (a power of 2), ``psp_bins``, ``psp_features``, ``decoder_channels``
  (0: the official decoders' ``num_classes``), ``bn_momentum``, ``dtype``; an unset key
  keeps :class:`SegmentationNet`'s default (CCT's PSP-ResNet-50)."""
  from bigvl.config import ConfigError, check_choice, positive_int
  from bigvl.models import dtypes

  m = SegmentationNet
  stages = tuple(int(s) for s in cfg.typed("stage_sizes", (list, tuple), m.stage_sizes))
  bins = tuple(int(b) for b in cfg.typed("psp_bins", (list, tuple), m.psp_bins))
  if not stages or min(stages) < 1 or not bins or min(bins) < 1:
    raise ConfigError(f"{cfg.path}.stage_sizes / psp_bins must be positive ints, got "
                      f"{stages} / {bins}")
  os_ = positive_int(cfg, "output_stride", m.output_stride)
  if os_ & (os_ - 1):
    raise ConfigError(f"{cfg.path}.output_stride must be a power of 2, got {os_}")
  stem = check_choice(f"{cfg.path}.stem", cfg.typed("stem", str, m.stem), STEMS)
  reachable = (4 if stem == "imagenet" else 1) * 2 ** (len(stages) - 1)
  if os_ > reachable or (stem == "imagenet" and os_ < 4):
    raise ConfigError(f"{cfg.path}.output_stride={os_} is not reachable with stem {stem!r} "
                      f"and {len(stages)} stages (at most {reachable})")
  return SegmentationNet(
      num_classes=num_classes, num_aux=num_aux, stage_sizes=stages,
      block=check_choice(f"{cfg.path}.block", cfg.typed("block", str, m.block), BLOCKS),
      width=positive_int(cfg, "width", m.width), stem=stem, output_stride=os_, psp_bins=bins,
      psp_features=positive_int(cfg, "psp_features", m.psp_features),
      decoder_channels=cfg.typed("decoder_channels", int, m.decoder_channels),
      bn_momentum=float(cfg.typed("bn_momentum", float, m.bn_momentum)),
      dtype=dtypes.from_config(cfg, m.dtype))
