"""``shapes_captions``: a synthetic image-caption TFDS dataset, deterministic from a seed.

Each RGB image holds 1-4 coloured shapes (circle, square, triangle, star) at random positions
on a dark background. Captions are generated from the scene, the largest object first, with a
spatial relation to the second one ("a red circle left of a blue square"), in several
paraphrases per image. ``label`` is the largest object's "<colour> <shape>" (24 classes), used
by zero-shot classification.

Builder configs:
* ``default``: independent random scenes.
* ``dups``: the flaw FFF fixes, in the train split: half of its scenes are jittered copies of
  100 prototypes, so a batch of 128 holds ~20 pairs of near-duplicate images whose captions are
  the same sentences (the other half are independent scenes). Validation and test are clean
  benchmarks of independent scenes, as Flickr/COCO are for web-trained models: retrieval there
  has a well-defined answer, while a test split of near duplicates makes equally correct
  captions tie with the query's own.

Prepared as ArrayRecord files and read with ``tfds.data_source`` (no network, no TF at read).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

COLORS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (170, 60, 220), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "star")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
NUM_CAPTIONS = 5


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 20_000
  num_val: int = 1_000
  num_test: int = 1_000
  seed: int = 0
  num_prototypes: int = 0  # > 0: some train scenes are jittered copies of this many prototypes
  dup_fraction: float = 1.0  # the fraction of train scenes that are copies (num_prototypes > 0)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
          color: tuple[int, int, int]) -> None:
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
  elif shape == "square":
    s = r * 0.9
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=color)
  elif shape == "star":
    pts = []
    for k in range(10):
      rad = r if k % 2 == 0 else r * 0.45
      a = -math.pi / 2 + k * math.pi / 5
      pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    draw.polygon(pts, fill=color)
  else:
    raise ValueError(shape)


def sample_scene(rng: np.random.Generator) -> list[dict]:
  """1-4 objects with distinct (colour, shape), sorted largest first, non-overlapping centres."""
  n = int(rng.integers(1, 5))
  colors = list(COLORS)
  objs, used = [], set()
  while len(objs) < n:
    c, s = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
    if (c, s) in used:
      continue
    x, y = rng.uniform(0.18, 0.82, size=2)
    if any((x - o["x"]) ** 2 + (y - o["y"]) ** 2 < 0.3 ** 2 for o in objs):
      if rng.random() < 0.9:
        continue
    used.add((c, s))
    objs.append({"color": c, "shape": s, "x": float(x), "y": float(y),
                 "r": float(rng.uniform(0.09, 0.17))})
  objs.sort(key=lambda o: -o["r"])
  return objs


def jitter_scene(objs: list[dict], rng: np.random.Generator, amount: float = 0.03) -> list[dict]:
  """A near-duplicate: same objects, positions and sizes moved a little."""
  out = []
  for o in objs:
    o = dict(o)
    o["x"] = float(np.clip(o["x"] + rng.normal(0, amount), 0.12, 0.88))
    o["y"] = float(np.clip(o["y"] + rng.normal(0, amount), 0.12, 0.88))
    o["r"] = float(o["r"] * rng.uniform(0.95, 1.05))
    out.append(o)
  out.sort(key=lambda o: -o["r"])
  return out


def render(objs: list[dict], size: int, supersample: int = 4) -> np.ndarray:
  big = size * supersample
  img = Image.new("RGB", (big, big), (15, 15, 25))
  draw = ImageDraw.Draw(img)
  for o in objs:
    _draw(draw, o["shape"], o["x"] * big, o["y"] * big, o["r"] * big, COLORS[o["color"]])
  return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _relation(a: dict, b: dict) -> tuple[str, str]:
  """(relation of a to b, inverse) by the larger of the horizontal/vertical offsets."""
  dx, dy = b["x"] - a["x"], b["y"] - a["y"]
  if abs(dx) >= abs(dy):
    return ("left of", "right of") if dx > 0 else ("right of", "left of")
  return ("above", "below") if dy > 0 else ("below", "above")


def captions(objs: list[dict], rng: np.random.Generator) -> list[str]:
  """NUM_CAPTIONS paraphrases of the scene; the largest object is always named first."""
  name = [f"{o['color']} {o['shape']}" for o in objs]
  main = name[0]
  if len(objs) == 1:
    caps = [f"a {main}", f"a single {main}", f"there is a {main}", f"a picture of a {main}",
            f"one {main} on a dark background"]
  else:
    rel, inv = _relation(objs[0], objs[1])
    rest = name[2:]
    tail = "".join(f" and a {n}" for n in rest)
    count = ["", "", "two", "three", "four"][len(objs)]
    caps = [f"a {main} {rel} a {name[1]}{tail}",
            f"a big {main} {rel} a smaller {name[1]}{tail}",
            f"a {name[1]} {inv} a {main}{tail}",
            f"{count} shapes: a {main} {rel} a {name[1]}{tail}",
            f"a picture of a {main} {rel} a {name[1]}{tail}"]
  order = rng.permutation(len(caps))
  return [caps[i] for i in order][:NUM_CAPTIONS]


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured-shapes scenes with generated captions (see module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "dups: 100 prototypes for half of the train scenes; clean eval splits."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="independent random scenes"),
      ShapesConfig(name="dups", description="half the train scenes copy 100 prototypes",
                   num_prototypes=100, dup_fraction=0.5),
      ShapesConfig(name="small", description="a small copy for tests", num_train=512,
                   num_val=64, num_test=128),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "captions": tfds.features.Sequence(tfds.features.Text(), length=NUM_CAPTIONS),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            "scene_id": np.int64,
        }),
        homepage="https://github.com/bigvl",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return {"train": self._generate_examples("train", cfg.num_train, 0),
            "validation": self._generate_examples("validation", cfg.num_val, 1),
            "test": self._generate_examples("test", cfg.num_test, 2)}

  def _generate_examples(self, split: str, n: int, split_index: int):
    cfg = self.builder_config
    rng = np.random.default_rng([cfg.seed, split_index])
    protos = None
    if cfg.num_prototypes and split == "train":
      prng = np.random.default_rng([cfg.seed, 99])
      protos = [sample_scene(prng) for _ in range(cfg.num_prototypes)]
    for i in range(n):
      # scene_id: the prototype's index, or a unique id >= num_prototypes for a fresh scene.
      if protos is not None and rng.random() < cfg.dup_fraction:
        scene_id = int(rng.integers(len(protos)))
        objs = jitter_scene(protos[scene_id], rng)
      else:
        objs, scene_id = sample_scene(rng), cfg.num_prototypes + i
      yield i, {"image": render(objs, cfg.image_size),
                "captions": captions(objs, rng),
                "label": CLASS_NAMES.index(f"{objs[0]['color']} {objs[0]['shape']}"),
                "scene_id": scene_id}
