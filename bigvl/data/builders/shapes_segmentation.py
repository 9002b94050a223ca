"""``shapes_segmentation``: a synthetic semantic-segmentation TFDS dataset, deterministic from
a seed (numpy only; no network).

Classes (:data:`CLASS_NAMES`, id = index): 0 ``background``, 1 ``circle``, 2 ``square``,
3 ``triangle``, 4 ``star``. Every pixel has one of these ids: there are no ignore pixels here
(255 is the ignore label of real datasets, e.g. VOC's boundaries read by ``bigvl.data.pairs``).

An image is RGB uint8 ``[S, S, 3]`` (``S`` = the config's ``image_size``, 32 by default):

* a *textured* background that changes from image to image (:data:`BACKGROUNDS`): oriented
  stripes (a sinusoid between two colours, from soft to nearly square-wave), smooth
  low-frequency colour noise (a sum of four random plane waves, squashed, mixing two colours)
  or a rotated checkerboard of two colours;
* 1-3 objects of *distinct* classes on top of it, in drawing order: a later object occludes an
  earlier one and the mask shows the visible, top-most one. Radius ``r`` (the circumradius of
  the shape) uniform in :data:`RADIUS` (0.12-0.25 of the image side), any rotation, centre
  anywhere at least ``0.6 r`` from the border (the object mostly inside), and a later object
  never reaches into the inner half of an earlier one's inscribed circle (so occlusion is
  partial).

Colour is informative but not sufficient. Each object class has its own hue family
(:data:`HUES`: circle red, square green, triangle blue, star yellow) with per-object jitter of
hue (+-0.035), saturation (0.55-1) and value (0.6-1), and a light fill texture (a sinusoidal
grating modulating the brightness by 5-15%). Background colours have any hue, but with
probability :data:`DISTRACTOR_P` each of the two is drawn from an object's hue family with a
similar saturation and value: many backgrounds contain pixels of exactly the colours of some
object. A per-pixel colour rule (k-means on RGB pixels, Hungarian-matched to the classes) is
therefore clearly imperfect, while a model that sees shape and local texture (the object's
weak grating against the background's strong stripes, checks or blotches) can do well.

Rendering (:func:`render_scene`) evaluates the scene at the centres of an odd ``supersample``
x ``supersample`` grid of sub-pixels per pixel (5 x 5): the image is the box average of the
sub-pixel colours (anti-aliased edges), the mask is the label of the centre sub-pixel, which is
the pixel's centre (nearest sampling), so image and mask agree.

Features:
* ``image``: uint8 ``[S, S, 3]``;
* ``mask``: uint8 ``[S, S, 1]`` class ids (the TFDS segmentation-mask style, PNG-encoded);
* ``labels``: the image-level labels of weakly-labelled training, a sequence of class ids
  0-3 = circle..star (``mask id - 1``, sorted), exactly the non-zero ids present in
  ``mask`` minus 1: an object with no pixel left in ``mask`` (not expected at ``S >= 32`` by
  the spacing rule above, possible for tiny images) is not listed, since it is not visible;
* ``num_objects``: int32, the number of visible objects (``len(labels)``: classes are
  distinct).

Builder configs: ``default`` (32 x 32, 4000 train, 500 validation, 500 test images) and
``small`` (32 x 32, 256 / 64 / 64, for tests); ``textures`` (4000 / 500 / 500) and
``textures_small`` (256 / 64 / 64): the unsupervised benchmark (:func:`sample_texture_scene`):
the same shapes, larger (radius 0.2-0.32), but every region filled with its class's pattern in
two colours of any hue, so colour carries no class information and only local texture does
(k-means on pixel colours is near chance there). The splits use different random streams
(``np.random.default_rng([seed, split_index])``). Every train image carries its mask; a
semi-supervised task picks its labeled part itself, by TFDS split slicing (a labeled source
``'train[:5%]'``) or by the task's ``input.num_labels``, and treats the rest as unlabeled.

The helpers the builder uses are public: :func:`sample_scene` (the scene: plain Python values
drawn from an ``np.random.Generator``), :func:`render_scene` (scene -> image, mask; a pure
function) and :func:`visible_labels`.

Prepared as ArrayRecord files and read with ``tfds.data_source`` (no network, no TF at read).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from bigvl.data.builders._png import png_splits

CLASS_NAMES = ("background", "circle", "square", "triangle", "star")
SHAPES = CLASS_NAMES[1:]
#: the HSV hue (in [0, 1)) at the centre of each object class's colour family.
HUES = {"circle": 0.0, "square": 0.33, "triangle": 0.62, "star": 0.14}
HUE_JITTER = 0.035
#: the background textures, one per image.
BACKGROUNDS = ("stripes", "noise", "checker")
#: the probability that a background colour is drawn from an object's hue family.
DISTRACTOR_P = 0.4
#: the range of the object radius (circumradius), a fraction of the image side.
RADIUS = (0.12, 0.25)
MAX_OBJECTS = 3

# Per shape, for radius r: the farthest point from the centre (EXTENT r) and the radius of the
# inscribed circle (CORE r), both as fractions of r.
_SQUARE_HALF_SIDE = 0.85
_STAR_INNER = 0.45
_EXTENT = {"circle": 1.0, "square": _SQUARE_HALF_SIDE * math.sqrt(2), "triangle": 1.0,
           "star": 1.0}
_CORE = {"circle": 1.0, "square": _SQUARE_HALF_SIDE, "triangle": 0.5,
         "star": _STAR_INNER * math.cos(math.pi / 5)}


#: ``appearance='texture'``: each class's fill pattern (colours carry no class information).
CLASS_TEXTURES = {"background": "noise", "circle": "stripes", "square": "checker",
                  "triangle": "flat", "star": "dots"}
#: the larger objects of the ``textures`` configs (their patterns need room to show).
TEXTURE_RADIUS = (0.2, 0.32)


@dataclasses.dataclass
class SegConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 4000
  num_val: int = 500
  num_test: int = 500
  seed: int = 0
  appearance: str = "hue"  # 'hue' (module docstring) or 'texture' (the classes are textures)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
  """An RGB colour in [0, 255] (floats) from HSV in [0, 1]."""
  return tuple(255.0 * c for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _object_color(shape: str, rng: np.random.Generator) -> tuple[float, float, float]:
  h = HUES[shape] + rng.uniform(-HUE_JITTER, HUE_JITTER)
  return _hsv(h, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))


def _background_color(rng: np.random.Generator) -> tuple[float, float, float]:
  """Any hue; with probability DISTRACTOR_P an object family's hue, saturation and value."""
  u, family, jitter = rng.random(), SHAPES[int(rng.integers(len(SHAPES)))], rng.uniform(-1, 1)
  h_any, s, v = rng.random(), rng.random(), rng.random()
  if u < DISTRACTOR_P:
    return _hsv(HUES[family] + 2 * HUE_JITTER * jitter, 0.4 + 0.6 * s, 0.45 + 0.55 * v)
  return _hsv(h_any, 0.05 + 0.8 * s, 0.15 + 0.8 * v)


def _wave(rng: np.random.Generator, lo: float, hi: float) -> dict[str, float]:
  """A plane wave: ``freq`` cycles per image side in [lo, hi], direction ``angle``, ``phase``."""
  return {"freq": float(rng.uniform(lo, hi)), "angle": float(rng.uniform(0, math.pi)),
          "phase": float(rng.uniform(0, 2 * math.pi))}


def _fits(shape: str, x: float, y: float, r: float, below: list[dict]) -> bool:
  """Whether an object placed on top of ``below`` leaves the inner half of each one's
  inscribed circle uncovered."""
  return all(math.hypot(x - o["x"], y - o["y"]) >= _EXTENT[shape] * r
             + 0.5 * _CORE[o["shape"]] * o["r"] for o in below)


def _any_color(rng: np.random.Generator) -> tuple[float, float, float]:
  return _hsv(rng.random(), 0.2 + 0.8 * rng.random(), 0.25 + 0.75 * rng.random())


def _fill(kind: str, rng: np.random.Generator) -> dict:
  """A ``textures``-config fill: ``kind`` with two colours of any hue (the same distribution
  for every class) and its pattern's waves."""
  return {"kind": kind, "colors": (_any_color(rng), _any_color(rng)),
          "stripes": _wave(rng, 8.0, 11.0), "sharpness": 3.0, "checker": _wave(rng, 4.5, 6.0),
          "dots": _wave(rng, 7.0, 9.0), "noise": [_wave(rng, 2.0, 4.0) for _ in range(4)]}


def _quiet_fill(rng: np.random.Generator) -> dict:
  """The ``textures`` background: smooth noise between a colour of any hue and a slightly
  different one (value +-0.15), so its low-frequency blotches are weaker than any object's
  pattern."""
  fill = _fill("noise", rng)
  h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in fill["colors"][0]))
  fill["colors"] = (fill["colors"][0], _hsv(h, s, float(np.clip(v + rng.uniform(-.15, .15),
                                                                 0, 1))))
  return fill


def sample_texture_scene(rng: np.random.Generator) -> dict:
  """A ``textures``-config scene: as :func:`sample_scene` but every region (the background and
  each object) is filled with its class's pattern (:data:`CLASS_TEXTURES`: background weak
  smooth colour noise (:func:`_quiet_fill`), circle fine stripes, square a checkerboard,
  triangle flat, star a grid of dots) in two colours of any hue, and the radii are
  :data:`TEXTURE_RADIUS`. Colour says nothing about the class; the local pattern says
  everything: the unsupervised benchmark."""
  scene = {"background": _quiet_fill(rng), "objects": []}
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  for k in rng.permutation(len(SHAPES))[:n]:
    shape = SHAPES[int(k)]
    for _ in range(100):
      r = float(rng.uniform(*TEXTURE_RADIUS))
      x, y = (float(v) for v in rng.uniform(0.6 * r, 1 - 0.6 * r, size=2))
      if _fits(shape, x, y, r, scene["objects"]):
        break
    else:
      continue
    scene["objects"].append({"shape": shape, "x": x, "y": y, "r": r,
                             "angle": float(rng.uniform(0, 2 * math.pi)),
                             "fill": _fill(CLASS_TEXTURES[shape], rng)})
  return scene


def sample_scene(rng: np.random.Generator) -> dict:
  """A random scene, all of it plain Python values (module docstring for the distributions).

  Returns ``{'background': {'kind', 'colors': (rgb, rgb), 'stripes': wave, 'sharpness',
  'checker': wave, 'noise': [wave] * 4}, 'objects': [{'shape', 'x', 'y', 'r', 'angle',
  'color', 'texture': wave | {'amp'}}, ...]}`` with colours as RGB floats in [0, 255],
  positions and radii as fractions of the image side (x right, y down), objects in drawing
  order (later on top). A wave is ``{'freq', 'angle', 'phase'}``. An object that finds no
  place after 100 tries is left out (rare; the scene keeps at least one object).
  """
  kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  background = {"kind": kind, "colors": (_background_color(rng), _background_color(rng)),
                "stripes": _wave(rng, 2.0, 7.0), "sharpness": float(rng.uniform(0.5, 4.0)),
                "checker": _wave(rng, 2.5, 8.0),
                "noise": [_wave(rng, 0.5, 2.5) for _ in range(4)]}
  n = int(rng.integers(1, MAX_OBJECTS + 1))
  objects: list[dict] = []
  for k in rng.permutation(len(SHAPES))[:n]:
    shape = SHAPES[int(k)]
    for _ in range(100):
      r = float(rng.uniform(*RADIUS))
      x, y = (float(v) for v in rng.uniform(0.6 * r, 1 - 0.6 * r, size=2))
      if _fits(shape, x, y, r, objects):
        break
    else:
      continue
    objects.append({"shape": shape, "x": x, "y": y, "r": r,
                    "angle": float(rng.uniform(0, 2 * math.pi)),
                    "color": _object_color(shape, rng),
                    "texture": {**_wave(rng, 5.0, 12.0), "amp": float(rng.uniform(0.05, 0.15))}})
  return {"background": background, "objects": objects}


def _plane(wave: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The wave's phase at points ``(x, y)``: ``2 pi freq (x cos a + y sin a) + phase``."""
  a = wave["angle"]
  return 2 * math.pi * wave["freq"] * (x * math.cos(a) + y * math.sin(a)) + wave["phase"]


def _background(bg: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The background's colours ``[..., 3]`` (float) at points ``(x, y)``."""
  if bg["kind"] == "stripes":
    k = bg["sharpness"]
    t = 0.5 + 0.5 * np.tanh(k * np.sin(_plane(bg["stripes"], x, y))) / math.tanh(k)
  elif bg["kind"] == "checker":
    w = bg["checker"]
    across = {**w, "angle": w["angle"] + math.pi / 2}
    t = (np.sin(_plane(w, x, y)) * np.sin(_plane(across, x, y)) > 0).astype(np.float64)
  elif bg["kind"] == "dots":
    w = bg["dots"]
    across = {**w, "angle": w["angle"] + math.pi / 2}
    t = (np.cos(_plane(w, x, y)) * np.cos(_plane(across, x, y)) > 0.25).astype(np.float64)
  elif bg["kind"] == "flat":
    t = np.zeros(np.shape(x))
  elif bg["kind"] == "noise":
    field = sum(np.sin(_plane(w, x, y)) for w in bg["noise"]) / math.sqrt(len(bg["noise"]))
    t = 0.5 + 0.5 * np.tanh(1.5 * field)
  else:
    raise ValueError(f"unknown background kind {bg['kind']!r}")
  c0, c1 = (np.asarray(c, np.float64) for c in bg["colors"])
  return c0 + t[..., None] * (c1 - c0)


def _polygon(obj: dict) -> np.ndarray:
  """The vertices ``[K, 2]`` (x, y) of a square, triangle or star, in image-side units."""
  shape, r, a = obj["shape"], obj["r"], obj["angle"]
  if shape == "square":
    radii, angles = [_SQUARE_HALF_SIDE * math.sqrt(2) * r] * 4, [a + math.pi / 4 + k * math.pi / 2
                                                                 for k in range(4)]
  elif shape == "triangle":
    radii, angles = [r] * 3, [a - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]
  elif shape == "star":
    radii = [r if k % 2 == 0 else _STAR_INNER * r for k in range(10)]
    angles = [a - math.pi / 2 + k * math.pi / 5 for k in range(10)]
  else:
    raise ValueError(f"{shape!r} is not a polygon")
  return np.array([(obj["x"] + q * math.cos(t), obj["y"] + q * math.sin(t))
                   for q, t in zip(radii, angles, strict=True)])


def _inside(obj: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Whether the points ``(x, y)`` lie in the object (bool, ``x``'s shape): a circle by
  distance, the polygons by the even-odd rule."""
  if obj["shape"] == "circle":
    return (x - obj["x"]) ** 2 + (y - obj["y"]) ** 2 <= obj["r"] ** 2
  verts = _polygon(obj)
  result = np.zeros(x.shape, bool)
  for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
    if y0 == y1:
      continue  # a horizontal edge crosses no horizontal ray
    crosses = (y0 > y) != (y1 > y)
    result ^= crosses & (x < x0 + (y - y0) * (x1 - x0) / (y1 - y0))
  return result


def render_scene(scene: dict, size: int, supersample: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """``(image uint8 [size, size, 3], mask uint8 [size, size])`` of a :func:`sample_scene`
  scene; a pure function of its arguments.

  The scene is evaluated at the centres of ``supersample x supersample`` sub-pixels per pixel
  (``supersample`` odd): the image is their box average, the mask the class id of the centre
  sub-pixel (the pixel's centre).
  """
  if supersample < 1 or supersample % 2 == 0:
    raise ValueError(f"supersample must be odd (its centre sub-pixel is the pixel centre), "
                     f"got {supersample}")
  n = size * supersample
  coords = (np.arange(n) + 0.5) / n
  x, y = np.meshgrid(coords, coords)  # x[i, j] = coords[j] (right), y[i, j] = coords[i] (down)
  image = _background(scene["background"], x, y)
  labels = np.zeros((n, n), np.uint8)
  for obj in scene["objects"]:
    m = _inside(obj, x, y)
    if "fill" in obj:  # the textures configs
      image[m] = _background(obj["fill"], x[m], y[m])
    else:
      tex = obj["texture"]
      shade = 1.0 + tex["amp"] * np.sin(_plane(tex, x[m], y[m]))
      image[m] = shade[:, None] * np.asarray(obj["color"], np.float64)
    labels[m] = CLASS_NAMES.index(obj["shape"])
  image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
  image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  c = supersample // 2
  return image, labels[c::supersample, c::supersample].copy()


def visible_labels(mask: np.ndarray) -> list[int]:
  """The image-level labels of a mask: the sorted non-zero class ids present, minus 1
  (0..3 = circle..star)."""
  return [int(v) - 1 for v in np.unique(mask) if v != 0]


class ShapesSegmentation(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes on textured backgrounds with per-pixel class masks (module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  BUILDER_CONFIGS = [
      SegConfig(name="default", description="4000 / 500 / 500 images of 32 x 32"),
      SegConfig(name="small", description="a small copy for tests", num_train=256, num_val=64,
                num_test=64),
      SegConfig(name="textures", description="classes are fill patterns, colours random "
                "(unsupervised segmentation)", appearance="texture"),
      SegConfig(name="textures_small", description="a small textures copy for tests",
                num_train=256, num_val=64, num_test=64, appearance="texture"),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    features = {
        "image": tfds.features.Image(shape=(size, size, 3)),
        "mask": tfds.features.Image(shape=(size, size, 1)),
        "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=list(SHAPES))),
        "num_objects": np.int32,
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/bigvl",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return png_splits({"train": self._generate_examples(cfg.num_train, 0),
                       "validation": self._generate_examples(cfg.num_val, 1),
                       "test": self._generate_examples(cfg.num_test, 2)}, self.info.features)

  def _generate_examples(self, n: int, split_index: int):
    cfg = self.builder_config
    rng = np.random.default_rng([cfg.seed, split_index])
    for i in range(n):
      scene = sample_texture_scene(rng) if cfg.appearance == "texture" else sample_scene(rng)
      image, mask = render_scene(scene, cfg.image_size)
      labels = visible_labels(mask)
      yield i, {"image": image, "mask": mask[..., None], "labels": labels,
                "num_objects": np.int32(len(labels))}
