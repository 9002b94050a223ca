"""Masked (PixelCNN-style) convolutions over 8 raster-scan orderings, and the autoregressive
segmentation network of Ouali, Hudelot & Tami 2020, "Autoregressive Unsupervised Image
Segmentation" (ECCV).

Orderings. Ordering ``o`` (``0 <= o < NUM_ORDERINGS = 8``) visits the pixels ``p = (y, x)`` in
the raster order (row by row, each row left to right) of ``T_o p``, where ``T_o``
(:func:`ordering_transform`) is one of the 8 signed 2x2 permutation matrices, the symmetries of
the square: ``o % 4`` quarter-turn rotations of the grid after ``o // 4`` transposes.
``o = 0`` (``T = I``) is the usual scan top-left -> bottom-right; the 8 orderings are the 4
rotations of that scan and of its transpose (the paper's 8 orderings).

"Before". ``q`` comes strictly before ``p`` in ordering ``o`` (``q <_o p``) iff ``T_o (q - p)``
is lexicographically negative: first coordinate < 0, or = 0 and second < 0. This is a strict
total order on the grid (lexicographic order, pulled back through the bijection ``T_o``) and
translation invariant (it depends on ``q - p`` only).

Masks. A ``kh x kw`` kernel tap at offset ``d = (dy, dx)`` from the centre reads the input at
``p + dilation * d``. :func:`causal_mask` keeps the taps with ``d <_o 0`` (PixelCNN's mask A)
and, with ``include_center``, also ``d = 0`` (mask B). ``dilation > 0`` scales ``d`` and keeps
its sign pattern, so a dilated tap is "before" iff the undilated one is.

Why a stack is causal. Take a first layer with mask A and any number of later layers with mask
B, any dilations, stride 1, SAME (zero) padding, and between them only per-pixel operations
(bias, eval-mode BatchNorm, ReLU, 1x1 convs, residual additions of a layer's own input).
Induction on depth: layer 1's output at ``p`` reads inputs at ``p + d`` with ``d <_o 0``, i.e.
at pixels ``q <_o p`` (padding taps read constants). If layer ``l - 1``'s output at every ``r``
depends only on inputs ``q <_o r``, layer ``l``'s output at ``p`` reads it at ``r = p + d``
with ``d <=_o 0`` (so ``r <=_o p``, by translation invariance) and hence depends only on
``q <_o r <=_o p``, so ``q <_o p`` by transitivity. Per-pixel operations keep this. So the
output at ``p`` is a function of the inputs strictly before ``p`` in ordering ``o``: the
network is autoregressive. Stride 1 is needed so that output and input pixels coincide; the
first pixel of the ordering sees no input at all (its output is a constant). Like every
PixelCNN stack of 3x3 masks this has a blind spot: not every earlier pixel is reached.

Inference. ``ordering=None`` applies no mask: "in inference, no masking is applied and we fall
back to the standard convolution" (the paper), the same weights unmasked. Every
off-centre tap is allowed by 4 of the 8 orderings and so is trained; the centre tap of a mask-A
layer is masked in every ordering, never gets a gradient, and is therefore initialised to zero
(:class:`MaskedConv` with ``include_center=False``), so that the inference convolution only
uses trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigvl.models import logical

Dtype = Any

NUM_ORDERINGS = 8

# The WideResNet convolution init (He-normal over fan-out, bigvl.models.wide_resnet), unnamed:
# MaskedConv adds the logical names [kh, kw, conv_in, conv_out] itself.
default_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _check_ordering(o: int) -> int:
  if isinstance(o, bool) or not isinstance(o, (int, np.integer)) or not 0 <= o < NUM_ORDERINGS:
    raise ValueError(f"ordering must be an int in [0, {NUM_ORDERINGS}), got {o!r}")
  return int(o)


def ordering_transform(o: int) -> np.ndarray:
  """``T_o`` [2, 2] int: ordering ``o`` is the raster order of ``T_o (y, x)``.

  ``T_o = R^(o % 4) F^(o // 4)`` with the transpose ``F (y, x) = (x, y)`` and the quarter turn
  ``R (y, x) = (x, -y)``; the 8 results are all signed 2x2 permutation matrices, so the 8
  orderings are distinct. ``T_0 = I``; ``o = 1``: columns left to right, each bottom to top.
  """
  o = _check_ordering(o)
  rot = np.array([[0, 1], [-1, 0]], np.int64)
  flip = np.array([[0, 1], [1, 0]], np.int64)
  return np.linalg.matrix_power(rot, o % 4) @ np.linalg.matrix_power(flip, o // 4)


def _before(o: int, d: np.ndarray) -> np.ndarray:
  """``d <_o 0`` for offsets ``d`` [..., 2]: ``T_o d`` lexicographically negative."""
  td = d @ ordering_transform(o).T
  return (td[..., 0] < 0) | ((td[..., 0] == 0) & (td[..., 1] < 0))


def pixel_rank(o: int, height: int, width: int) -> np.ndarray:
  """Rank [H, W] (int64, a permutation of ``0 .. H W - 1``) of each pixel in ordering ``o``.

  ``o = 0``: ``rank[y, x] = y W + x``. The others are the same scan on the rotated / transposed
  grid: ``rank_o(p) = #{q : q <_o p}``, the position of ``T_o p`` in raster order.
  """
  t = ordering_transform(o)
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  tp = np.stack([ys.ravel(), xs.ravel()], axis=-1) @ t.T
  order = np.lexsort((tp[:, 1], tp[:, 0]))  # primary key: first coordinate
  rank = np.empty(height * width, np.int64)
  rank[order] = np.arange(height * width)
  return rank.reshape(height, width)


def _kernel_hw(kernel_size: int | Sequence[int]) -> tuple[int, int]:
  kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
  if kh <= 0 or kw <= 0 or kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"masked convolutions need odd kernel sizes, got {kernel_size!r}")
  return kh, kw


def causal_mask(kernel_size: int | Sequence[int], o: int, include_center: bool) -> np.ndarray:
  """The mask [kh, kw] (float32 0/1) of ordering ``o``: tap ``(i, j)`` at offset ``d = (i - kh
  // 2, j - kw // 2)`` is kept iff ``d <_o 0`` (the neighbour comes strictly before the
  centre), plus the centre iff ``include_center`` (PixelCNN's mask B; without it mask A).

  Exactly ``(kh kw - 1) / 2`` off-centre taps are kept (``d`` and ``-d`` are on opposite
  sides). ``o = 0``, 3x3, mask A: ``[[1, 1, 1], [1, 0, 0], [0, 0, 0]]``.
  """
  kh, kw = _kernel_hw(kernel_size)
  dy, dx = np.meshgrid(np.arange(kh) - kh // 2, np.arange(kw) - kw // 2, indexing="ij")
  keep = _before(o, np.stack([dy, dx], axis=-1))
  keep[kh // 2, kw // 2] = include_center
  return keep.astype(np.float32)


def causal_masks(kernel_size: int | Sequence[int], include_center: bool) -> np.ndarray:
  """The masks of all orderings, [NUM_ORDERINGS, kh, kw] float32."""
  return np.stack([causal_mask(kernel_size, o, include_center) for o in range(NUM_ORDERINGS)])


def _zero_center(init: logical.Initializer) -> logical.Initializer:
  """``init`` with the centre tap of a [kh, kw, in, out] kernel set to zero."""

  def zeroed(key, shape, dtype=jnp.float32):
    w = init(key, shape, dtype)
    return w.at[shape[0] // 2, shape[1] // 2].set(0)

  return zeroed


class MaskedConv(nn.Module):
  """Stride-1 SAME convolution whose kernel is masked by the ordering's causal mask.

  ``y[p] = sum_d x[p + dilation d] (W[d] * M_o[d]) (+ b)`` with ``M_o = causal_mask(
  kernel_size, o, include_center)``, or ``M = 1`` (the plain convolution) when ``ordering`` is
  None. The masks of all orderings are one constant [8, kh, kw] array indexed by ``ordering``,
  so a traced ordering (a random one per step) needs no recompilation; a traced value outside
  ``[0, 8)`` is clamped by the indexing, a Python int there is a ``ValueError``.

  Attributes:
    features: output channels.
    kernel_size: odd int or (kh, kw) (3).
    dilation: kernel dilation (1).
    include_center: mask B (True) or mask A (False; the first layer of a stack). With mask A
      the centre tap, masked in every ordering, is initialised to zero (see the module doc).
    use_bias: add a bias (True).
    dtype: computation dtype; the parameters are float32.
    kernel_init: the unnamed initialiser of the [kh, kw, in, out] kernel (WideResNet's).
  """

  features: int
  kernel_size: int | tuple[int, int] = 3
  dilation: int = 1
  include_center: bool = True
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: logical.Initializer = default_conv_init

  @nn.compact
  def __call__(self, x: jax.Array, ordering: jax.Array | int | None) -> jax.Array:
    """x: [B, H, W, C] -> [B, H, W, features]; ``ordering``: int32 scalar (traced or a Python
    int) or None (no mask: the inference convolution)."""
    kh, kw = _kernel_hw(self.kernel_size)
    init = self.kernel_init if self.include_center else _zero_center(self.kernel_init)
    kernel = self.param("kernel", logical.named(init, None, None, "conv_in", "conv_out"),
                        (kh, kw, x.shape[-1], self.features), jnp.float32)
    if ordering is not None:
      if isinstance(ordering, (int, np.integer)):
        mask = causal_mask((kh, kw), _check_ordering(ordering), self.include_center)
      else:
        masks = jnp.asarray(causal_masks((kh, kw), self.include_center))
        mask = masks[jnp.asarray(ordering, jnp.int32)]
      kernel = kernel * mask[:, :, None, None]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(1, 1), padding="SAME",
        rhs_dilation=(self.dilation, self.dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", logical.named(nn.initializers.zeros_init(), "conv_out"),
                        (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class AutoregressiveNet(nn.Module):
  """The autoregressive segmentation network (Ouali et al. 2020), at full input resolution.

  ``h_0 = x``; ``h_1 = relu(bn(conv_A(x)))`` (mask A, dilation ``dilations[0]``); for
  ``l >= 2``: ``h_l = relu(bn(conv_B(h_{l-1})))`` (mask B, dilation ``dilations[l-1]``), plus
  ``h_{l-1}`` when ``residual`` (never around the mask-A layer: its input at ``p`` is the
  current pixel). Heads, 1x1 (per pixel): ``clusters`` (K logits, float32) and ``features``
  (``feature_dim``, float32, L2-normalised per pixel). Stride 1 everywhere, so for a given
  ordering the outputs at ``p`` depend only on the input pixels strictly before ``p`` (module
  doc); ``ordering=None`` runs the plain (unmasked) convolutions, for inference.

  BatchNorm: in train mode its batch statistics are means over all pixels of the batch, so each
  output also depends (through two per-channel scalars per layer) on every pixel: a leak of
  global statistics only, as in the paper's network; eval mode (running averages) is exactly
  causal, and that is what the causality tests check. Call ``apply(..., train=True,
  mutable=["batch_stats"])`` in training.

  Attributes:
    num_clusters: K, the cluster logits per pixel (Autoregressive Clustering).
    width: channels of every masked layer (64).
    dilations: one per masked layer; ``dilations[0]`` is the mask-A layer's, so the depth is
      ``len(dilations)`` ((1, 1, 2, 2, 4, 1)).
    kernel_size: odd kernel size of the masked layers (3).
    feature_dim: D, the per-pixel representation (Autoregressive Representation Learning).
    residual: add each mask-B layer's input to its output (True).
    bn_momentum, bn_epsilon: BatchNorm's (0.9, 1e-5).
    dtype: computation dtype; the heads' outputs are float32.
  """

  num_clusters: int = 10
  width: int = 64
  dilations: tuple[int, ...] = (1, 1, 2, 2, 4, 1)
  kernel_size: int = 3
  feature_dim: int = 64
  residual: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ordering: jax.Array | int | None,
               train: bool) -> dict[str, jax.Array]:
    """x: [B, H, W, C] -> ``{'clusters': [B, H, W, K], 'features': [B, H, W, D]}``."""
    if not self.dilations:
      raise ValueError("AutoregressiveNet needs at least one layer (dilations)")
    h = x.astype(self.dtype)
    for i, dilation in enumerate(self.dilations):
      y = MaskedConv(self.width, self.kernel_size, dilation, include_center=i > 0,
                     use_bias=False, dtype=self.dtype, name=f"conv{i}")(h, ordering)
      y = nn.BatchNorm(use_running_average=not train, axis_name=None, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, dtype=self.dtype, name=f"bn{i}",
                       **logical.batch_norm_inits())(y)
      y = nn.relu(y)
      h = h + y if (self.residual and i > 0) else y
    clusters = logical.dense(self.num_clusters, ("conv_out", "classes"), dtype=self.dtype,
                             name="clusters")(h).astype(jnp.float32)
    f = logical.dense(self.feature_dim, ("conv_out", "proj"), dtype=self.dtype,
                      name="features")(h).astype(jnp.float32)
    f = f * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(f), axis=-1, keepdims=True), 1e-12))
    return {"clusters": clusters, "features": f}


def from_config(cfg, num_clusters: int) -> AutoregressiveNet:
  """``config.model`` (``name='masked_conv'``): ``width``, ``dilations`` (a tuple/list of
  positive ints, one per masked layer, so also the depth), ``kernel_size``, ``feature_dim``,
  ``residual``, ``bn_momentum``, ``bn_epsilon``, ``dtype``; an unset key keeps
  :class:`AutoregressiveNet`'s default."""
  from bigvl.config import ConfigError, positive_int
  from bigvl.models import dtypes

  m = AutoregressiveNet
  dilations = cfg.typed("dilations", (tuple, list), m.dilations)
  if not dilations or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                              for d in dilations):
    raise ConfigError(f"{cfg.path}.dilations must be a non-empty tuple of positive ints, "
                      f"got {dilations!r}")
  kernel_size = positive_int(cfg, "kernel_size", m.kernel_size)
  if kernel_size % 2 == 0:
    raise ConfigError(f"{cfg.path}.kernel_size must be odd, got {kernel_size}")
  return AutoregressiveNet(num_clusters=num_clusters, width=positive_int(cfg, "width", m.width),
                           dilations=tuple(dilations), kernel_size=kernel_size,
                           feature_dim=positive_int(cfg, "feature_dim", m.feature_dim),
                           residual=bool(cfg.typed("residual", bool, m.residual)),
                           bn_momentum=float(cfg.typed("bn_momentum", float, m.bn_momentum)),
                           bn_epsilon=float(cfg.typed("bn_epsilon", float, m.bn_epsilon)),
                           dtype=dtypes.from_config(cfg, m.dtype))
