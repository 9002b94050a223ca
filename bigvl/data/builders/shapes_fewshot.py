"""``shapes_fewshot``: a synthetic few-shot classification TFDS dataset, deterministic from a
seed (numpy only; no network).

Why: few-shot classification on *unseen classes* (the SCL experiment: a backbone trained on the
base classes, evaluated by N-way K-shot episodes on novel ones) and, in the ``shifted`` configs,
a shifted domain for black-box adaptation (the LFA experiment: a two-tower model trained on
``shapes_captions`` is adapted on ``shifted``'s train split and evaluated on its test split).

Classes: a class is a (colour, texture, shape) triple. Colours and shapes are exactly
``shapes_captions``' (:data:`COLORS`: red green blue yellow purple white; :data:`SHAPES`:
circle square triangle star), textures are the four fill patterns of :data:`TEXTURES` (plain
striped checkered dotted): 6 x 4 x 4 = 96 classes. The class id is the product order, colour
first, then texture, then shape: ``id = (colour * 4 + texture) * 4 + shape``
(:func:`class_id`), the name ``"<colour> <texture> <shape>"`` (:data:`CLASS_NAMES`, e.g.
``"red striped circle"``). The (colour, shape) pair is a ``shapes_captions`` class
(:data:`OBJECT_NAMES` = ``shapes_captions.CLASS_NAMES``, same order and ids;
:func:`object_label`), so a zero-shot ``shapes_captions`` model can name the object.

Class splits (few-shot, disjoint): ``np.random.default_rng(1234).permutation(96)``, the first
60 are the train classes (:data:`TRAIN_CLASSES`), the next 16 the validation classes
(:data:`VAL_CLASSES`), the last 20 the test classes (:data:`TEST_CLASSES`): miniImageNet's
64/16/20 proportions. Each tuple is sorted. Every colour, texture and shape (and every one of
the 24 (colour, shape) objects) appears among the train classes (checked at import), so a novel
class is a new *combination* of seen attributes.

An image (RGB uint8 ``[S, S, 3]``, ``S`` = the config's ``image_size``, 32 by default) holds one
object of its class (:func:`sample_object`, rendered by ``shapes_segmentation.render_scene``):

* shape geometry as ``shapes_segmentation``'s; circumradius ``r`` uniform in :data:`RADIUS`
  (0.25-0.42 of the side), any rotation, centre at least ``0.7 r`` from the border (mostly
  inside);
* colour: the ``shapes_captions`` RGB of the colour name with jitter in HSV (hue +-0.02,
  saturation and value x 0.85-1), so it stays recognisably its name;
* texture: the pattern between that colour and a darker shade of it (value x 0.35-0.5), with a
  random phase, orientation and scale: ``plain`` flat; ``striped`` a grating of 7-11 cycles
  per side, soft to nearly square-wave; ``checkered`` a rotated checkerboard of 4-6 cycles per
  side; ``dotted`` a grid of dots of 6-8.5 cycles per side;
* background (:data:`BACKGROUNDS`, one per image): smooth colour ``noise`` (four plane waves),
  a ``gradient`` (one slow wave) or faint ``stripes``, between two colours of any hue with low
  saturation (<= 0.3) and medium value (0.15-0.65): less saturated than every object but white,
  and darker than white;
* anti-aliased by 3 x 3 supersampling (the config's ``supersample``; 5 x 5 costs 2.8 times
  as much for no visible gain at this object size), then Gaussian pixel noise (sigma 2-6 of
  255, its own stream: :func:`render` is a pure function of the spec).

This is a shifted domain relative to ``shapes_captions`` (one larger, textured object on a
textured background instead of flat shapes on a dark flat background): intended.

Features:
* ``image``: uint8 ``[S, S, 3]``;
* ``label``: ClassLabel(:data:`CLASS_NAMES`), the global class id (0-95, in every config);
* ``object_label``: ClassLabel(:data:`OBJECT_NAMES`), the (colour, shape) id of
  ``shapes_captions``;
* ``texture``: ClassLabel(:data:`TEXTURES`);
* ``class_name``: Text, ``CLASS_NAMES[label]``.

Builder configs (images per class, train / validation / test):
* ``default``: few-shot splits by class: ``train`` the 60 train classes x 600 (as
  miniImageNet), ``validation`` the 16 validation classes x 100, ``test`` the 20 test classes x
  100 (39,600 images);
* ``small`` (tests): the same class splits, 16 / 8 / 8 per class; its images are the first
  ones of ``default``'s (the same streams);
* ``shifted``: every split holds all 96 classes: ``train`` 40 per class (what a model is
  adapted on), ``test`` 20 per class (what it is evaluated on); no validation split; seed 1,
  so no image is one of ``default``'s;
* ``shifted_small``: 4 / 4 per class.

Streams: example ``k`` of class ``c`` in split ``i`` (train 0, validation 1, test 2) is drawn
from ``np.random.default_rng([seed, i, c, k])``: splits never share a stream and any example
is reproducible alone (:func:`make_example`). The examples are generated class by class with
keys ``"<c>_<k>"``; TFDS stores them in the order of a hash of the key, a fixed deterministic
shuffle (the training reader shuffles anyway).

Prepared as ArrayRecord files and read with ``tfds.data_source`` (no network, no TF at read).
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from bigvl.data.builders import shapes_captions, shapes_segmentation
from bigvl.data.builders._png import png_splits

COLORS = shapes_captions.COLORS
SHAPES = shapes_captions.SHAPES
TEXTURES = ("plain", "striped", "checkered", "dotted")
#: each texture's fill kind of ``shapes_segmentation.render_scene``.
_FILL_KINDS = {"plain": "flat", "striped": "stripes", "checkered": "checker", "dotted": "dots"}
BACKGROUNDS = ("noise", "gradient", "stripes")
#: the range of the object radius (circumradius), a fraction of the image side.
RADIUS = (0.25, 0.42)
#: the object's centre is at least this many radii from the border.
MARGIN = 0.7

CLASS_NAMES = tuple(f"{c} {t} {s}" for c in COLORS for t in TEXTURES for s in SHAPES)
OBJECT_NAMES = shapes_captions.CLASS_NAMES
SPLIT_SEED = 1234
_ORDER = np.random.default_rng(SPLIT_SEED).permutation(len(CLASS_NAMES))
TRAIN_CLASSES = tuple(sorted(int(c) for c in _ORDER[:60]))
VAL_CLASSES = tuple(sorted(int(c) for c in _ORDER[60:76]))
TEST_CLASSES = tuple(sorted(int(c) for c in _ORDER[76:]))
#: the few-shot class split of each TFDS split.
SPLIT_CLASSES = {"train": TRAIN_CLASSES, "validation": VAL_CLASSES, "test": TEST_CLASSES}
SPLIT_INDEX = {"train": 0, "validation": 1, "test": 2}


def class_attributes(label: int) -> tuple[str, str, str]:
  """``(colour, texture, shape)`` of a global class id."""
  colour, rest = divmod(int(label), len(TEXTURES) * len(SHAPES))
  texture, shape = divmod(rest, len(SHAPES))
  return tuple(COLORS)[colour], TEXTURES[texture], SHAPES[shape]


def class_id(colour: str, texture: str, shape: str) -> int:
  """The global class id of ``(colour, texture, shape)`` (the product order)."""
  return (list(COLORS).index(colour) * len(TEXTURES) + TEXTURES.index(texture)) \
      * len(SHAPES) + SHAPES.index(shape)


def object_label(label: int) -> int:
  """The ``shapes_captions`` class id (:data:`OBJECT_NAMES`) of a global class id."""
  colour, _, shape = class_attributes(label)
  return OBJECT_NAMES.index(f"{colour} {shape}")


def _check_splits() -> None:
  train = [class_attributes(c) for c in TRAIN_CLASSES]
  everything = set(TRAIN_CLASSES) | set(VAL_CLASSES) | set(TEST_CLASSES)
  if len(everything) != len(CLASS_NAMES) or len(TRAIN_CLASSES) + len(VAL_CLASSES) + \
      len(TEST_CLASSES) != len(CLASS_NAMES):
    raise AssertionError("the class splits must partition the classes")
  for values, attr in ((COLORS, 0), (TEXTURES, 1), (SHAPES, 2)):
    if {a[attr] for a in train} != set(values):
      raise AssertionError(f"an attribute of {tuple(values)} is missing from the train classes")
  if {(a[0], a[2]) for a in train} != {tuple(n.split()) for n in OBJECT_NAMES}:
    raise AssertionError("a (colour, shape) object is missing from the train classes")


_check_splits()


def _rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
  """An RGB colour in [0, 255] (floats) from HSV in [0, 1]."""
  return tuple(255.0 * c for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def object_color(colour: str, rng: np.random.Generator) -> tuple[float, float, float]:
  """The colour name's ``shapes_captions`` RGB, jittered in HSV (hue +-0.02, saturation and
  value x 0.85-1)."""
  h, s, v = colorsys.rgb_to_hsv(*(c / 255.0 for c in COLORS[colour]))
  return _rgb(h + rng.uniform(-0.02, 0.02), s * rng.uniform(0.85, 1.0),
              v * rng.uniform(0.85, 1.0))


def _grating(rng: np.random.Generator, lo: float, hi: float) -> dict[str, float]:
  """A plane wave of ``render_scene``: ``freq`` cycles per side in [lo, hi], any direction and
  phase."""
  return {"freq": float(rng.uniform(lo, hi)), "angle": float(rng.uniform(0, math.pi)),
          "phase": float(rng.uniform(0, 2 * math.pi))}


def object_fill(colour: str, texture: str, rng: np.random.Generator) -> dict:
  """The object's fill (a ``shapes_segmentation.render_scene`` fill): ``texture``'s pattern
  between the jittered colour and a darker shade of it. A fixed number of draws whatever the
  texture. Also the fills of ``shapes_captions``' ``equiv`` configs."""
  c0 = object_color(colour, rng)
  c1 = tuple(c * rng.uniform(0.35, 0.5) for c in c0)
  waves = {"stripes": _grating(rng, 7.0, 11.0), "checker": _grating(rng, 4.0, 6.0),
           "dots": _grating(rng, 6.0, 8.5)}
  sharpness = float(rng.uniform(1.5, 5.0))
  kind = _FILL_KINDS[texture]
  fill = {"kind": kind, "colors": (c0, c1)}
  if kind in waves:
    fill[kind] = waves[kind]
  if kind == "stripes":
    fill["sharpness"] = sharpness
  return fill


def _background(rng: np.random.Generator) -> dict:
  """A low-saturation background of :data:`BACKGROUNDS` (module docstring). A fixed number of
  draws whatever the kind."""
  kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
  h, s, v = rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.15, 0.65)
  dh, s1, dv = rng.uniform(-0.08, 0.08), rng.uniform(0.0, 0.3), rng.uniform(-0.2, 0.2)
  noise = [_grating(rng, 0.5, 2.5) for _ in range(4)]
  slow = _grating(rng, 0.2, 0.5)
  stripes, sharpness = _grating(rng, 2.0, 6.0), float(rng.uniform(0.5, 2.0))
  if kind == "stripes":  # faint: half the value difference
    dv *= 0.5
  colors = (_rgb(h, s, v), _rgb(h + dh, s1, float(np.clip(v + dv, 0.1, 0.7))))
  if kind == "noise":
    return {"kind": "noise", "colors": colors, "noise": noise}
  if kind == "gradient":  # a slow wave: less than half a cycle across the image
    return {"kind": "noise", "colors": colors, "noise": [slow]}
  return {"kind": "stripes", "colors": colors, "stripes": stripes, "sharpness": sharpness}


def sample_object(label: int, rng: np.random.Generator) -> dict:
  """The spec of one image of class ``label``: plain Python values drawn from ``rng``.

  Returns ``{'scene': <a shapes_segmentation.render_scene scene: 'background' and one object
  {'shape', 'x', 'y', 'r', 'angle', 'fill'}>, 'noise_sigma', 'noise_seed'}``.
  """
  colour, texture, shape = class_attributes(label)
  background = _background(rng)
  r = float(rng.uniform(*RADIUS))
  x, y = (float(v) for v in rng.uniform(MARGIN * r, 1 - MARGIN * r, size=2))
  obj = {"shape": shape, "x": x, "y": y, "r": r, "angle": float(rng.uniform(0, 2 * math.pi)),
         "fill": object_fill(colour, texture, rng)}
  return {"scene": {"background": background, "objects": [obj]},
          "noise_sigma": float(rng.uniform(2.0, 6.0)),
          "noise_seed": int(rng.integers(2**31))}


def render(spec: dict, size: int, supersample: int = 3) -> np.ndarray:
  """The uint8 image ``[size, size, 3]`` of a :func:`sample_object` spec; a pure function of
  its arguments: ``shapes_segmentation.render_scene`` (anti-aliased by ``supersample`` odd)
  plus Gaussian pixel noise from ``np.random.default_rng(spec['noise_seed'])``."""
  image, _ = shapes_segmentation.render_scene(spec["scene"], size, supersample)
  noise = np.random.default_rng(spec["noise_seed"]).normal(0.0, spec["noise_sigma"],
                                                           image.shape)
  return np.clip(np.rint(image + noise), 0, 255).astype(np.uint8)


def make_example(label: int, k: int, split: str, seed: int = 0, size: int = 32,
                 supersample: int = 3) -> dict:
  """Example ``k`` of class ``label`` in ``split`` of a config with ``seed``,
  ``image_size`` ``size`` and ``supersample``: exactly the stored one (the TFDS features)."""
  spec = sample_object(label, np.random.default_rng([seed, SPLIT_INDEX[split], label, k]))
  return {"image": render(spec, size, supersample), "label": int(label),
          "object_label": object_label(label),
          "texture": TEXTURES.index(class_attributes(label)[1]), "class_name": CLASS_NAMES[label]}


@dataclasses.dataclass
class FewShotConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  train_per_class: int = 600
  val_per_class: int = 100  # 0: no validation split
  test_per_class: int = 100
  all_classes: bool = False  # every split holds all 96 classes (shifted) instead of its own
  seed: int = 0
  supersample: int = 3  # odd: sub-pixels per pixel side (anti-aliasing)


class ShapesFewshot(tfds.core.GeneratorBasedBuilder):
  """One textured coloured shape per image, 96 (colour, texture, shape) classes (module
  docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  BUILDER_CONFIGS = [
      FewShotConfig(name="default", description="few-shot class splits 60 / 16 / 20, "
                    "600 / 100 / 100 images per class"),
      FewShotConfig(name="small", description="a small copy for tests", train_per_class=16,
                    val_per_class=8, test_per_class=8),
      FewShotConfig(name="shifted", description="all 96 classes in train (40 per class) and "
                    "test (20 per class): the shifted domain of shapes_captions models",
                    train_per_class=40, val_per_class=0, test_per_class=20, all_classes=True,
                    seed=1),
      FewShotConfig(name="shifted_small", description="a small shifted copy for tests",
                    train_per_class=4, val_per_class=0, test_per_class=4, all_classes=True,
                    seed=1),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    features = {
        "image": tfds.features.Image(shape=(size, size, 3)),
        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        "object_label": tfds.features.ClassLabel(names=list(OBJECT_NAMES)),
        "texture": tfds.features.ClassLabel(names=list(TEXTURES)),
        "class_name": tfds.features.Text(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/bigvl",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    counts = {"train": cfg.train_per_class, "validation": cfg.val_per_class,
              "test": cfg.test_per_class}
    return png_splits({split: self._generate_examples(split, n)
                       for split, n in counts.items() if n > 0}, self.info.features)

  def _generate_examples(self, split: str, per_class: int):
    cfg = self.builder_config
    classes = range(len(CLASS_NAMES)) if cfg.all_classes else SPLIT_CLASSES[split]
    for label in classes:
      for k in range(per_class):
        yield f"{label}_{k}", make_example(label, k, split, cfg.seed, cfg.image_size,
                                           cfg.supersample)
