"""Weak / strong augmentation: determinism, shapes, translation, cutout, PIL-equivalent ops."""

import grain
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from bigvl.data import augment as A

SHAPES = [(28, 28, 1), (8, 8, 1), (32, 32, 3)]


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fn", [A.weak_augment, A.strong_augment])
def test_deterministic_shape_dtype(fn, shape):
  im = _image(shape)
  outs = [fn(im, np.random.default_rng(7)) for _ in range(2)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert outs[0].shape == shape and outs[0].dtype == np.uint8
  others = [fn(im, np.random.default_rng(s)) for s in range(8)]
  assert any(not np.array_equal(o, others[0]) for o in others[1:])
  np.testing.assert_array_equal(im, _image(shape))  # input untouched


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(A.OPS))
def test_each_op_shape_dtype(name, shape):
  im = _image(shape)
  for level in (0.0, 0.5, 1.0):
    out = A.OPS[name](im, level, np.random.default_rng(0))
    assert out.shape == shape and out.dtype == np.uint8 and out is not im


def test_weak_translate_moves_content():
  im = np.zeros((28, 28, 1), np.uint8)
  im[14, 14] = 255
  shifts = set()
  for seed in range(60):
    out = A.weak_augment(im, np.random.default_rng(seed), flip=False)
    (y,), (x,) = np.nonzero(out[..., 0] == 255)
    assert out.sum() == 255  # one pixel, still inside: a pure shift
    shifts.add((int(y) - 14, int(x) - 14))
  p = 4  # round(0.125 * 28)
  assert all(abs(dy) <= p and abs(dx) <= p for dy, dx in shifts)
  assert len(shifts) > 20 and max(abs(d) for s in shifts for d in s) == p


def test_translate_reflect_equals_pad_and_crop():
  im = _image((8, 8, 3))
  padded = np.pad(im, ((2, 2), (2, 2), (0, 0)), mode="reflect")
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      np.testing.assert_array_equal(A.translate_reflect(im, dy, dx),
                                    padded[2 - dy:2 - dy + 8, 2 - dx:2 - dx + 8])


def test_flip_off_and_on():
  im = np.zeros((8, 8, 1), np.uint8)
  im[:, :4] = 200  # left half bright
  # max_translate=0: only the flip can change the image.
  flipped = [A.weak_augment(im, np.random.default_rng(s), max_translate=0.0)[0, 0, 0] == 0
             for s in range(40)]
  assert 5 < sum(flipped) < 35
  for s in range(40):
    np.testing.assert_array_equal(
        A.weak_augment(im, np.random.default_rng(s), flip=False, max_translate=0.0), im)


def test_cutout_zeroes_a_patch():
  im = np.full((28, 28, 1), 200, np.uint8)
  out = A.cutout(im, np.random.default_rng(0), 6, fill=0)
  zero = out[..., 0] == 0
  ys, xs = np.nonzero(zero)
  # A solid (border-clipped) rectangle of zeros, at most 6x6, everything else untouched.
  assert 0 < zero.sum() <= 36
  assert zero.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
  assert np.all(out[~zero] == 200)
  gray = A.cutout(im, np.random.default_rng(0), 6)  # FixMatch default: gray
  np.testing.assert_array_equal(gray[..., 0] == A.CUTOUT_GRAY, zero)
  np.testing.assert_array_equal(A.cutout(im, np.random.default_rng(0), 0), im)
  # Interior centre: a full 6x6 square.
  sizes = {int((A.cutout(im, np.random.default_rng(s), 6, fill=0) == 0).sum())
           for s in range(30)}
  assert 36 in sizes


def test_strong_augment_changes_more_than_weak():
  im = _image((32, 32, 3), 3)
  rng_w, rng_s = np.random.default_rng(1), np.random.default_rng(1)
  weak = [A.weak_augment(im, rng_w, max_translate=0.0, flip=False) for _ in range(20)]
  strong = [A.strong_augment(im, rng_s, max_translate=0.0, flip=False) for _ in range(20)]
  assert all(np.array_equal(w, im) for w in weak)
  assert sum(not np.array_equal(s, im) for s in strong) >= 15


def test_rand_augment_changes_images_without_cutout():
  """With Cutout, flip and translation off, what changes the image is RandAugment alone: most
  draws of 2 ops change it (identity-only draws and posterize at 8 bits do not), and with only
  ``identity`` to draw from nothing changes."""
  im = _image((32, 32, 3), 4)
  off = dict(max_translate=0.0, flip=False, cutout_max_fraction=0.0)
  rng = np.random.default_rng(2)
  outs = [A.strong_augment(im, rng, **off) for _ in range(40)]
  assert sum(not np.array_equal(o, im) for o in outs) >= 32
  assert len({o.tobytes() for o in outs}) >= 32  # different ops / magnitudes each time
  for s in range(10):
    np.testing.assert_array_equal(
        A.strong_augment(im, np.random.default_rng(s), ops=("identity",), **off), im)


@pytest.mark.parametrize("name", [n for n in A.OPS if n != "identity"])
def test_rand_augment_applies_the_drawn_op(name):
  """``rand_augment`` with one op to draw from and ``num_ops=1`` gives that op's output at some
  magnitude: one of the op's outputs on a fine grid of levels (either sign for the signed
  ops), to within 1 (a blend factor between two grid points rounds either way)."""
  im = _image((16, 16, 3), 5)
  if name in ("autocontrast", "equalize"):
    im = (im // 4 + 60).astype(np.uint8)  # a narrow range, so that they change the image
  levels = np.linspace(0.0, 1.0, 2001)
  # default_rng(2) makes ``_signed`` draw +, default_rng(0) - (checked in _sign's test).
  candidates = np.stack([A.OPS[name](im, float(lv), np.random.default_rng(k))
                         for lv in levels for k in (2, 0)]).astype(np.int16)
  changed = 0
  for s in range(6):
    out = A.rand_augment(im, np.random.default_rng(s), num_ops=1, ops=(name,))
    dist = np.abs(candidates - out.astype(np.int16)).reshape(len(candidates), -1).max(1)
    assert dist.min() <= 1, (name, s)
    changed += not np.array_equal(out, im)
  assert changed >= 4, name


def _pil(im):
  return Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im)


def _np(img, c):
  a = np.asarray(img)
  return a[..., None] if c == 1 else a


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_numpy_ops_match_pil(shape):
  c = shape[-1]
  for seed in range(4):
    im = _image(shape, seed)
    if seed % 2:
      im = (im // 4 + 60).astype(np.uint8)  # narrow range: autocontrast / equalize matter
    np.testing.assert_array_equal(A.equalize(im, 0.0, None), _np(ImageOps.equalize(_pil(im)), c))
    diff = np.abs(A.autocontrast(im, 0.0, None).astype(int)
                  - _np(ImageOps.autocontrast(_pil(im)), c))
    assert diff.max() <= 1
    for level in (0.0, 0.5, 1.0):
      f = 0.05 + 0.9 * level
      enhancers = {"sharpness": ImageEnhance.Sharpness, "contrast": ImageEnhance.Contrast,
                   "brightness": ImageEnhance.Brightness}
      if c == 3:
        enhancers["color"] = ImageEnhance.Color
      for name, enh in enhancers.items():
        ref = _np(enh(_pil(im)).enhance(f), c)
        diff = np.abs(A.OPS[name](im, level, None).astype(int) - ref)
        assert diff.max() <= 2, (name, level)
    np.testing.assert_array_equal(A.posterize(im, 0.0, None), _np(ImageOps.posterize(_pil(im), 4),
                                                                   c))
    np.testing.assert_array_equal(A.solarize(im, 0.5, None),
                                  _np(ImageOps.solarize(_pil(im), 128), c))


def _pil_affine(im, matrix):
  """PIL's own inverse-affine warp: output pixel (x, y) samples input (a x + b y + c,
  d x + e y + f), nearest neighbour, black fill."""
  img = _pil(im)
  out = img.transform(img.size, Image.AFFINE, tuple(matrix), resample=Image.NEAREST,
                      fillcolor=0 if im.shape[-1] == 1 else (0, 0, 0))
  return _np(out, im.shape[-1])


def _sign(seed):
  """The sign ``_signed`` draws first from ``default_rng(seed)``: + if random() < 0.5."""
  return 1.0 if np.random.default_rng(seed).random() < 0.5 else -1.0


@pytest.mark.parametrize("shape", [(28, 28, 1), (9, 13, 3)])
@pytest.mark.parametrize("level", [0.3, 1.0])
def test_geometric_ops_match_pil(shape, level):
  """rotate / shear / translate against PIL on matrices written out here: rotate is PIL's
  ``Image.rotate`` about the centre (by -angle: the op's matrix turns the other way), shears
  are ``x + s (y - h/2)`` (resp. ``y + s (x - w/2)``) about the centre, translations shift by
  0.3 level of the size."""
  im = _image(shape, 6)
  h, w = shape[:2]
  assert (_sign(2), _sign(0)) == (1.0, -1.0)
  for seed in (2, 0):
    sg = _sign(seed)
    angle = sg * 30.0 * level
    want = _np(_pil(im).rotate(-angle, resample=Image.NEAREST, fillcolor=(
        0 if shape[-1] == 1 else (0, 0, 0))), shape[-1])
    got = A.rotate(im, level, np.random.default_rng(seed))
    np.testing.assert_array_equal(got, want, err_msg=f"rotate {seed}")
    assert np.mean(np.any(got != im, axis=-1)) > 0.3 * level
    s = sg * 0.3 * level
    for name, matrix in (("shear_x", (1, s, -s * h / 2, 0, 1, 0)),
                         ("shear_y", (1, 0, 0, s, 1, -s * w / 2)),
                         ("translate_x", (1, 0, sg * 0.3 * level * w, 0, 1, 0)),
                         ("translate_y", (1, 0, 0, 0, 1, sg * 0.3 * level * h))):
      got = A.OPS[name](im, level, np.random.default_rng(seed))
      np.testing.assert_array_equal(got, _pil_affine(im, matrix), err_msg=f"{name} {seed}")
      if level == 1.0:  # a shift of at least a pixel somewhere
        assert not np.array_equal(got, im), name


def test_geometric_ops_keep_centre():
  im = np.zeros((9, 9, 1), np.uint8)
  im[3:6, 3:6] = 255
  for name in ("rotate", "shear_x", "shear_y"):
    out = A.OPS[name](im, 1.0, np.random.default_rng(0))
    assert out[4, 4, 0] == 255, name
  for name, axis in (("translate_x", 1), ("translate_y", 0)):
    out = A.OPS[name](im, 1.0, np.random.default_rng(0))  # 0.3 * 9 = 2.7 px
    ys, xs = np.nonzero(out[..., 0])
    moved, kept = (xs, ys) if axis == 1 else (ys, xs)
    assert 2.0 <= abs(moved.mean() - 4.0) <= 3.0, name
    assert kept.mean() == 4.0, name


def test_grain_random_map_deterministic():
  images = [_image((8, 8, 1), s) for s in range(6)]
  def build():
    return grain.MapDataset.source(images).random_map(
        lambda im, rng: A.strong_augment(im, rng, flip=False), seed=42)
  a, b = build(), build()
  for i in range(len(images)):
    np.testing.assert_array_equal(a[i], b[i])


def test_rejects_bad_input():
  with pytest.raises(ValueError):
    A.weak_augment(np.zeros((8, 8), np.uint8), np.random.default_rng(0))
  with pytest.raises(ValueError):
    A.strong_augment(np.zeros((8, 8, 1), np.float32), np.random.default_rng(0))
