"""Weak and strong image augmentation for semi-supervised learning (host side, numpy + PIL).

Per-example functions of a ``uint8 [H, W, C]`` image (``C`` = 1 or 3) and a
``np.random.Generator``; they return a new ``uint8 [H, W, C]`` array and are deterministic given
the generator's state, so they fit ``grain``'s ``random_map``::

    ds = grain.MapDataset.source(src).random_map(
        lambda e, rng: {**e, "image": weak_augment(e["image"], rng, flip=False)}, seed=0)

They run on the host in the input pipeline (not on device): the per-image random choices
(which ops, magnitudes, offsets) are data-dependent control flow that numpy/PIL handle
cheaply, and grain can spread them over worker processes.

* ``weak_augment`` (FixMatch's "weak"; also the Pi-model / Mean Teacher / MixMatch / UDA
  stochastic augmentation): random horizontal flip (p = 0.5; pass ``flip=False`` for digits)
  and a random translation by up to 12.5% of the size in x and y, with reflect padding (the
  pad-by-4-and-crop of 32x32 CIFAR).
* ``strong_augment`` (FixMatch's RandAugment variant, Sohn et al. 2020, Sec. 2.3 and
  Table 12, also UDA's): ``weak_augment``, then ``num_ops`` (2) ops drawn uniformly from
  ``OPS``, each with a magnitude drawn uniformly from its range at every call (no global
  magnitude ``M``), then Cutout of a gray square of side ``L * size``, ``L ~ U(0, 0.5)``.

``OPS`` (ranges from FixMatch Table 12; ``level ~ U(0, 1)`` maps onto them):

============  ==============================================================
identity
autocontrast  stretch each channel's range to 0..255
equalize      histogram equalisation (PIL)
rotate        angle in [-30, 30] degrees
solarize      invert the pixels >= threshold, threshold in [0, 256]
color         enhancement factor in [0.05, 0.95] (blend towards gray; no-op on 1 channel)
contrast      factor in [0.05, 0.95] (blend towards the mean gray level)
brightness    factor in [0.05, 0.95] (blend towards black)
sharpness     factor in [0.05, 0.95] (blend towards PIL's SMOOTH-filtered image)
shear_x/y     shear in [-0.3, 0.3], about the image centre
translate_x/y shift in [-0.3, 0.3] of the size
posterize     keep 4..8 bits
============  ==============================================================

Geometric ops (PIL affine warps) use nearest-neighbour sampling and fill the uncovered area with
0 (black), PIL's defaults, as in the reference implementations. ``AFFINE`` gives their random
matrices, so ``rand_augment_aligned`` can warp label masks exactly like the image (the
segmentation-aware path ``bigvl.data.transforms`` uses). The other ops are numpy (LUTs and
blends matching PIL's ``ImageOps`` / ``ImageEnhance`` formulas), which is faster than a PIL round
trip on these tiny images.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

Op = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]

CUTOUT_GRAY = 127
# Geometric ops: nearest neighbour, PIL's default and what the FixMatch code uses (bilinear is
# ~3x slower on 32x32).
RESAMPLE = Image.Resampling.NEAREST


# ---------------------------------------------------------------------------------------------
# Weak augmentation.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _reflect_index(n: int, shift: int) -> np.ndarray:
  """Source rows of a ``shift``-pixel move with numpy.pad(mode="reflect") edges (no edge repeat:
  ... 2 1 | 0 1 2 ... n-1 | n-2 ...)."""
  i = np.arange(n) - shift
  if n == 1:
    return np.zeros_like(i)
  period = 2 * (n - 1)
  i = np.abs(i) % period
  out = np.where(i >= n, period - i, i)
  out.setflags(write=False)
  return out


def translate_reflect(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """Shift ``image`` content by ``(dy, dx)`` pixels (down, right), reflect-filling the edge.

  Equals cropping ``np.pad(image, p, mode="reflect")`` at offset ``(p - dy, p - dx)``.
  """
  h, w = image.shape[:2]
  return image[_reflect_index(h, dy)[:, None], _reflect_index(w, dx)[None, :]]


def random_shift(height: int, width: int, rng: np.random.Generator,
                 max_fraction: float = 0.125) -> tuple[int, int]:
  """``(dy, dx)``: uniform integers in ``[-p, p]`` per axis, ``p = round(max_fraction * size)``
  (two draws, y first)."""
  ph, pw = int(round(max_fraction * height)), int(round(max_fraction * width))
  return int(rng.integers(-ph, ph + 1)), int(rng.integers(-pw, pw + 1))


def random_translate(image: np.ndarray, rng: np.random.Generator,
                     max_fraction: float = 0.125) -> np.ndarray:
  """``translate_reflect`` by a ``random_shift``."""
  dy, dx = random_shift(*image.shape[:2], rng, max_fraction)
  if dy == 0 and dx == 0:
    return image.copy()
  return translate_reflect(image, dy, dx)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Horizontal flip with probability 0.5."""
  return image[:, ::-1].copy() if rng.random() < 0.5 else image.copy()


def weak_augment(image: np.ndarray, rng: np.random.Generator, *, flip: bool = True,
                 max_translate: float = 0.125) -> np.ndarray:
  """Random horizontal flip (if ``flip``) then a random reflect-padded translation.

  Args:
    image: uint8 [H, W, C].
    rng: the per-example generator (grain's ``random_map`` passes one).
    flip: False for digits (a mirrored digit is another class or none).
    max_translate: the largest shift as a fraction of the size (12.5%: 4 px of 32, 4 of 28,
      1 of 8).
  Returns:
    uint8 [H, W, C], a new array.
  """
  check_image(image)
  if flip:
    image = random_flip(image, rng)
  return random_translate(image, rng, max_translate)


# ---------------------------------------------------------------------------------------------
# RandAugment ops: (image uint8 [H, W, C], level in [0, 1]) -> image.
# ---------------------------------------------------------------------------------------------


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(img: Image.Image, channels: int) -> np.ndarray:
  out = np.asarray(img)
  return out[..., None] if channels == 1 else out


def _blend(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  """PIL ImageEnhance: ``degenerate + factor * (image - degenerate)``, clipped to uint8."""
  out = degenerate + factor * (image.astype(np.float32) - degenerate)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _gray(image: np.ndarray) -> np.ndarray:
  if image.shape[-1] == 1:
    return image.astype(np.float32)
  return (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _signed(level: float, rng: np.random.Generator) -> float:
  return level if rng.random() < 0.5 else -level


def _affine(image: np.ndarray, matrix: Sequence[float]) -> np.ndarray:
  """PIL inverse-affine warp (output (x, y) samples input (a x + b y + c, d x + e y + f))."""
  img = _to_pil(image)
  fill = 0 if image.shape[-1] == 1 else (0, 0, 0)
  out = img.transform(img.size, Image.Transform.AFFINE, tuple(matrix), resample=RESAMPLE,
                      fillcolor=fill)
  return _from_pil(out, image.shape[-1])


def warp_mask(mask: np.ndarray, matrix: Sequence[float], fill: int) -> np.ndarray:
  """The ``_affine`` warp of a label map (``[H, W]`` or ``[H, W, 1]``, integer): the same
  nearest-neighbour sampling as the image (so labels stay on their pixels), ``fill`` where the
  warp leaves the image."""
  mask = np.asarray(mask)
  if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[-1] != 1):
    raise ValueError(f"expected a label map [H, W] or [H, W, 1], got {mask.shape}")
  plane = mask.reshape(mask.shape[:2]).astype(np.int32)  # PIL mode 'I'
  img = Image.fromarray(plane)
  out = img.transform(img.size, Image.Transform.AFFINE, tuple(matrix), resample=RESAMPLE,
                      fillcolor=int(fill))
  return np.asarray(out).astype(mask.dtype).reshape(mask.shape)


def identity(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  del level, rng
  return image.copy()


def _apply_luts(image: np.ndarray, luts: Sequence[np.ndarray | None]) -> np.ndarray:
  out = image.copy()
  for c, lut in enumerate(luts):
    if lut is not None:
      out[..., c] = lut[image[..., c]]
  return out


def autocontrast(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  """Per channel, map ``[min, max]`` linearly onto ``[0, 255]`` (PIL ``autocontrast``)."""
  del level, rng
  luts = []
  ramp = np.arange(256, dtype=np.float64)
  for c in range(image.shape[-1]):
    lo, hi = int(image[..., c].min()), int(image[..., c].max())
    if hi <= lo:
      luts.append(None)
      continue
    scale = 255.0 / (hi - lo)
    luts.append(np.clip((ramp * scale - lo * scale).astype(np.int64), 0, 255).astype(np.uint8))
  return _apply_luts(image, luts)


def equalize(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  """Per-channel histogram equalisation (the LUT of PIL ``ImageOps.equalize``)."""
  del level, rng
  luts = []
  for c in range(image.shape[-1]):
    hist = np.bincount(image[..., c].ravel(), minlength=256)
    nonzero = hist[hist > 0]
    step = (int(nonzero.sum()) - int(nonzero[-1])) // 255 if len(nonzero) > 1 else 0
    if step == 0:
      luts.append(None)
      continue
    below = np.concatenate([[0], np.cumsum(hist)[:-1]])
    luts.append(np.minimum((step // 2 + below) // step, 255).astype(np.uint8))
  return _apply_luts(image, luts)


# Geometric ops are a random inverse-affine matrix (``level, rng, height, width -> matrix``)
# and ``_affine``; the matrix alone lets a mask follow the image (``rand_augment_aligned``).


def _rotate_matrix(level: float, rng: np.random.Generator, h: int, w: int) -> tuple:
  angle = math.radians(_signed(30.0 * level, rng))
  cx, cy = w / 2.0, h / 2.0
  cos, sin = math.cos(angle), math.sin(angle)
  # Inverse map about the centre: input = R(-angle) (output - c) + c.
  return (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def rotate(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  return _affine(image, _rotate_matrix(level, rng, *image.shape[:2]))


def solarize(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  threshold = 256.0 * level
  return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def _factor(level: float) -> float:
  return 0.05 + 0.9 * level


def color(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  if image.shape[-1] == 1:
    return image.copy()
  return _blend(_gray(image), image, _factor(level))


def contrast(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  mean = float(np.floor(_gray(image).mean() + 0.5))
  return _blend(np.float32(mean), image, _factor(level))


def brightness(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  return _blend(np.float32(0.0), image, _factor(level))


def sharpness(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  """Blend with PIL's SMOOTH filter (3x3 ``[[1,1,1],[1,5,1],[1,1,1]] / 13``, border kept)."""
  del rng
  x = image.astype(np.float32)
  smooth = x.copy()
  if image.shape[0] > 2 and image.shape[1] > 2:
    acc = 4.0 * x[1:-1, 1:-1]
    for dy in (0, 1, 2):
      for dx in (0, 1, 2):
        acc += x[dy:dy + x.shape[0] - 2, dx:dx + x.shape[1] - 2]
    smooth[1:-1, 1:-1] = np.floor(acc / 13.0 + 0.5)
  return _blend(smooth, image, _factor(level))


def _shear_x_matrix(level: float, rng: np.random.Generator, h: int, w: int) -> tuple:
  s = _signed(0.3 * level, rng)
  return (1.0, s, -s * (h / 2.0), 0.0, 1.0, 0.0)


def _shear_y_matrix(level: float, rng: np.random.Generator, h: int, w: int) -> tuple:
  s = _signed(0.3 * level, rng)
  return (1.0, 0.0, 0.0, s, 1.0, -s * (w / 2.0))


def _translate_x_matrix(level: float, rng: np.random.Generator, h: int, w: int) -> tuple:
  return (1.0, 0.0, _signed(0.3 * level, rng) * w, 0.0, 1.0, 0.0)


def _translate_y_matrix(level: float, rng: np.random.Generator, h: int, w: int) -> tuple:
  return (1.0, 0.0, 0.0, 0.0, 1.0, _signed(0.3 * level, rng) * h)


def shear_x(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  return _affine(image, _shear_x_matrix(level, rng, *image.shape[:2]))


def shear_y(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  return _affine(image, _shear_y_matrix(level, rng, *image.shape[:2]))


def translate_x(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  return _affine(image, _translate_x_matrix(level, rng, *image.shape[:2]))


def translate_y(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  return _affine(image, _translate_y_matrix(level, rng, *image.shape[:2]))


def posterize(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  bits = 4 + int(min(level, 0.999) * 5)  # 4..8
  mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
  return image & mask


OPS: dict[str, Op] = {
    "identity": identity,
    "autocontrast": autocontrast,
    "equalize": equalize,
    "rotate": rotate,
    "solarize": solarize,
    "color": color,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate_x,
    "translate_y": translate_y,
    "posterize": posterize,
}

#: The geometric ``OPS`` as matrix makers ``(level, rng, height, width) -> inverse affine``.
AFFINE: dict[str, Callable[[float, np.random.Generator, int, int], tuple]] = {
    "rotate": _rotate_matrix,
    "shear_x": _shear_x_matrix,
    "shear_y": _shear_y_matrix,
    "translate_x": _translate_x_matrix,
    "translate_y": _translate_y_matrix,
}


def cutout(image: np.ndarray, rng: np.random.Generator, size: int,
           fill: int = CUTOUT_GRAY) -> np.ndarray:
  """Set a ``size x size`` square, centred at a uniform random pixel, to ``fill``.

  The square is clipped at the border (as in FixMatch's ``CutoutAbs``). FixMatch fills gray
  (127); pass ``fill=0`` for black.
  """
  out = image.copy()
  if size <= 0:
    return out
  h, w = image.shape[:2]
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  y0, x0 = max(cy - size // 2, 0), max(cx - size // 2, 0)
  out[y0:min(y0 + size, h), x0:min(x0 + size, w)] = fill
  return out


def random_cutout(image: np.ndarray, rng: np.random.Generator, max_fraction: float = 0.5,
                  fill: int = CUTOUT_GRAY) -> np.ndarray:
  """``cutout`` of side ``round(U(0, max_fraction) * min(H, W))`` (one draw, then cutout's)."""
  size = int(round(rng.uniform(0.0, max_fraction) * min(image.shape[:2])))
  return cutout(image, rng, size, fill=fill)


def rand_augment_aligned(image: np.ndarray, masks: Sequence[np.ndarray],
                         rng: np.random.Generator, num_ops: int = 2,
                         ops: Sequence[str] = tuple(OPS), mask_fill: int = 255
                         ) -> tuple[np.ndarray, list[np.ndarray]]:
  """``rand_augment`` of ``image`` that moves label ``masks`` with it: a geometric op
  (``AFFINE``) warps every mask with the image's matrix (``warp_mask``, ``mask_fill`` outside);
  photometric ops leave the masks alone. The image and the draws equal ``rand_augment``'s."""
  check_image(image)
  out, masks = image, list(masks)
  h, w = image.shape[:2]
  for k in rng.integers(0, len(ops), size=num_ops):
    name, level = ops[int(k)], float(rng.random())
    if name in AFFINE:
      matrix = AFFINE[name](level, rng, h, w)
      out = _affine(out, matrix)
      masks = [warp_mask(m, matrix, mask_fill) for m in masks]
    else:
      out = OPS[name](out, level, rng)
  return (out if out is not image else image.copy()), masks


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 ops: Sequence[str] = tuple(OPS)) -> np.ndarray:
  """Apply ``num_ops`` ops drawn uniformly (with replacement) from ``ops``, each with a fresh
  uniform magnitude ``level ~ U(0, 1)`` (FixMatch's RandAugment variant)."""
  return rand_augment_aligned(image, (), rng, num_ops=num_ops, ops=ops)[0]


def strong_augment(image: np.ndarray, rng: np.random.Generator, *, flip: bool = True,
                   max_translate: float = 0.125, num_ops: int = 2,
                   ops: Sequence[str] = tuple(OPS), cutout_max_fraction: float = 0.5,
                   cutout_fill: int = CUTOUT_GRAY) -> np.ndarray:
  """``weak_augment`` -> ``rand_augment(num_ops)`` -> Cutout of side ``U(0, max) * size``.

  Args:
    image: uint8 [H, W, C].
    rng: the per-example generator.
    flip, max_translate: as in ``weak_augment``.
    num_ops: N, the number of RandAugment ops (2).
    ops: names from ``OPS`` to draw from (all by default).
    cutout_max_fraction: the largest Cutout side as a fraction of ``min(H, W)`` (0.5; 0 turns
      Cutout off).
    cutout_fill: the Cutout value (127, gray, as in FixMatch).
  Returns:
    uint8 [H, W, C], a new array.
  """
  image = weak_augment(image, rng, flip=flip, max_translate=max_translate)
  image = rand_augment(image, rng, num_ops=num_ops, ops=ops)
  return random_cutout(image, rng, cutout_max_fraction, fill=cutout_fill)


def check_image(image: np.ndarray) -> None:
  """ValueError unless ``image`` is uint8 ``[H, W, 1 or 3]`` (what these functions take)."""
  if image.ndim != 3 or image.dtype != np.uint8 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
