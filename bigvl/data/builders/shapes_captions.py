"""``shapes_captions``: a synthetic image-caption TFDS dataset, deterministic from a seed.

Each RGB image holds 1-4 coloured shapes (circle, square, triangle, star) at random positions
on a dark background. Captions are generated from the scene, the largest object first, with a
spatial relation to the second one ("a red circle left of a blue square"), in several
paraphrases per image. ``label`` is the largest object's "<colour> <shape>" (24 classes), used
by zero-shot classification.

Since 1.2.0 each example also has, all deterministic functions of the scene graph (no random
draws, so every earlier field is bitwise what 1.1.0 gives):

* ``caption``: the canonical short caption (:func:`canonical_caption`, the first paraphrase).
* ``description``: an exhaustive description (:func:`describe`): the object count, then every
  object, largest first, with its size word (:func:`size_word`, none for medium), colour,
  shape, its cell of a 3x3 grid (:func:`position_word`) and, after the first, its relation to
  the first (largest) object: "three shapes. a large red circle at the top left. a blue
  square at the bottom, below the red circle. ..."
* ``objects``: the scene graph, one entry per object in the same order: ``color``, ``shape``,
  ``size`` (text) and ``x``, ``y`` (centre, fraction of the image, y down), ``r`` (radius).

Every word any of these texts can contain is in :func:`vocabulary` (a fixed word list, so a
word-level tokenizer for this dataset needs no training pass). ``version='1.1.0'`` (in
``SUPPORTED_VERSIONS``, e.g. ``shapes_captions/small:1.1.0``) still prepares the old examples,
bitwise.

Builder configs:
* ``default``: independent random scenes.
* ``dups``: the flaw FFF fixes, in the train split: half of its scenes are jittered copies of
  100 prototypes, so a batch of 128 holds ~20 pairs of near-duplicate images whose captions are
  the same sentences (the other half are independent scenes). Validation and test are clean
  benchmarks of independent scenes, as Flickr/COCO are for web-trained models: retrieval there
  has a well-defined answer, while a test split of near duplicates makes equally correct
  captions tie with the query's own.

* ``cooc``: the pool of CLIP-DPO's experiment (an SFT set that teaches hallucination, as real
  SFT data does). Scenes have a co-occurrence structure: with probability ``cooccur`` the
  largest object's :func:`partner` is in the scene too, so "red circle" and "green square"
  go together as "fork" and "knife" do. Extra fields (deterministic from the seed):
  ``sft_description``: :func:`describe` of the scene plus, with probability ``sft_noise``, one
  object that is *not* in the image (the partner of a present object if one is absent: the
  co-occurrence prior an annotator or a model falls for); ``hallucinated``: that object's
  "<colour> <shape>" or ""; ``question`` / ``answer``: a POPE-style existence question
  ("is there a blue square in the image ?") about a present object or an absent one (half of
  them the absent partner), its true "yes" / "no"; ``sft_answer``: the answer of the SFT
  pool, "yes" for an absent partner with probability ``sft_noise``. The clean ``caption``,
  ``captions`` and ``description`` are unchanged in meaning: the truth evaluators score
  against.

* ``equiv``: the pool of FFF's false-negative experiment: semantically equivalent pairs with
  different images and different wording. A *concept* is a scene graph without geometry: the
  ordered list of objects (colour, shape), largest first, and, with >= 2 objects, the
  relation of object 0 to object 1 (:func:`_relation`); :func:`concept_key`. The pool
  (:func:`concept_pool`) holds ``num_concepts`` = 300 concepts drawn by :func:`sample_scene`
  from their own stream, a candidate rejected when one of its paraphrases (:func:`paraphrases`,
  the 5 sentences ``captions`` shuffles) is one of a pooled concept's, also up to the order of
  the trailing "and a ..." objects (:func:`caption_meaning`: "a blue square right of a red
  circle" comes from two size orders; "... and a white star and a red circle" says what "...
  and a red circle and a white star" says). So the ground truth is clean: two examples have the
  same ``concept`` <=> the same caption set; different concepts have disjoint caption sets.
  The seed-0 pool has 24 concepts of 1 object (all there are), 89 of 2, 100 of 3, 87 of 4.
  Every example is a rendering of a concept (:func:`rerender`, :func:`render_textured`): new
  positions and radii (the size order kept, so object 0 stays the largest, and the relation by
  rejection sampling), a fill texture per object of ``shapes_fewshot.TEXTURES`` (plain,
  striped, checkered, dotted, with a jittered colour: a nuisance no text mentions) and a
  background shade jittered around the dark default (+-8 per channel); its ``captions`` are
  ``captions(objs, rng)`` of the rendering, the same 5 paraphrases shuffled, so a run that
  samples one caption per image mostly sees different wordings of one concept. Train: 20,000
  examples, each of a uniformly drawn concept (``concept`` i.i.d. uniform on the pool). Why:
  FFF's false negatives are different images whose captions say the same thing; a batch of 128
  train examples holds on average C(128, 2) / 300 = 8128 / 300 = 27.1 same-concept pairs, and
  1 - (299/300)^127 = 34.6% of its images (44 of 128) have at least one same-concept partner
  that a contrastive loss pushes away (measured on 50 random batches of the train split: 27.9
  pairs, 34.9%). Validation: 100 concepts x ``eval_renders`` = 5
  renderings, test: the other 200 concepts of the pool x 5 (:func:`eval_concepts`; every
  rendering with its own stream), so retrieval with ``scene_key='scene_id'`` (or
  ``'concept'``) counts every rendering of the query's concept as a hit: the test measures
  whether a model treats renderings of one concept as one thing. Features: those of 1.2.0 plus
  ``concept`` (int64, the index in the pool; ``scene_id`` is the same number) and ``texture``
  in ``objects``. Equivalence is defined on ``captions`` / ``caption`` only: ``description``
  names size words and grid cells, which change between renderings. Caveat: the captions of a
  1-object concept ("a red circle") are also true of a multi-object image whose largest object
  is a red circle (entailment, not equivalence); the ground truth does not count that.
  ``equiv_small`` (tests): 48 concepts, 512 / 64 / 128 examples, 4 renderings per eval concept.

Prepared as ArrayRecord files and read with ``tfds.data_source`` (no network, no TF at read).
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from bigvl.data.builders import shapes_segmentation
from bigvl.data.builders._png import png_splits

COLORS = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240),
    "yellow": (240, 220, 40), "purple": (170, 60, 220), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "star")
CLASS_NAMES = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
NUM_CAPTIONS = 5
#: the extra text fields of the ``cooc`` config (module docstring).
SFT_FIELDS = ("sft_description", "hallucinated", "question", "answer", "sft_answer")


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 20_000
  num_val: int = 1_000
  num_test: int = 1_000
  seed: int = 0
  num_prototypes: int = 0  # > 0: some train scenes are jittered copies of this many prototypes
  dup_fraction: float = 1.0  # the fraction of train scenes that are copies (num_prototypes > 0)
  cooccur: float = 0.0  # P(the largest object's partner is in the scene); > 0: SFT fields too
  sft_noise: float = 0.0  # P(the SFT description / answer hallucinates the absent partner)
  num_concepts: int = 0  # > 0: every example re-renders a concept of a pool this large (equiv)
  eval_renders: int = 5  # (equiv) renderings per validation / test concept


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


#: the background colour of :func:`render` (the ``equiv`` configs jitter it).
BACKGROUND = (15, 15, 25)


def _crowded(x: float, y: float, objs: list[dict], rng: np.random.Generator) -> bool:
  """Whether to reject a centre ``(x, y)``: closer than 0.3 to a placed object's centre, then
  with probability 0.9 (a draw from ``rng`` only in that case)."""
  return any((x - o["x"]) ** 2 + (y - o["y"]) ** 2 < 0.3 ** 2 for o in objs) \
      and rng.random() < 0.9


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
    if _crowded(x, y, objs, rng):
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
  img = Image.new("RGB", (big, big), BACKGROUND)
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


#: radius thresholds of the size words: r < SIZE_BINS[0] small, r >= SIZE_BINS[1] large (the
#: sampled radii are uniform in [0.09, 0.17]: about a third each).
SIZE_BINS = (0.115, 0.145)
SIZES = ("small", "medium", "large")
_ROWS, _COLS = ("top", "", "bottom"), ("left", "", "right")
_COUNTS = ("zero", "one", "two", "three", "four", "five")


def size_word(obj: dict) -> str:
  """``'small'`` / ``'medium'`` / ``'large'`` by the radius (:data:`SIZE_BINS`)."""
  return SIZES[int(obj["r"] >= SIZE_BINS[0]) + int(obj["r"] >= SIZE_BINS[1])]


def position_word(obj: dict) -> str:
  """The object's cell of a 3x3 grid of the image (thirds of x and y, y down): ``'top
  left'``, ``'top'``, ..., ``'center'``, ..., ``'bottom right'``."""
  row = _ROWS[min(int(obj["y"] * 3), 2)]
  col = _COLS[min(int(obj["x"] * 3), 2)]
  return " ".join(w for w in (row, col) if w) or "center"


def canonical_caption(objs: list[dict]) -> str:
  """The one short caption of a scene: ``captions``' first paraphrase, before shuffling."""
  return paraphrases(objs)[0]


def describe(objs: list[dict]) -> str:
  """The exhaustive description (module docstring): ``"<count> shape(s)."`` then per object
  ``"a [size ]<colour> <shape> at the <position>[, <relation> the <first object>]."``."""
  n = len(objs)
  parts = [f"{_COUNTS[n]} shape{'s' if n > 1 else ''}."]
  first = f"{objs[0]['color']} {objs[0]['shape']}"
  for i, o in enumerate(objs):
    size = size_word(o)
    text = f"a {'' if size == 'medium' else size + ' '}{o['color']} {o['shape']} at the " \
           f"{position_word(o)}"
    if i > 0:
      text += f", {_relation(o, objs[0])[0]} the {first}"
    parts.append(text + ".")
  return " ".join(parts)


def scene_graph(objs: list[dict]) -> dict[str, list]:
  """The ``objects`` feature: parallel lists ``color``, ``shape``, ``size``, ``x``, ``y``,
  ``r``, largest object first."""
  return {"color": [o["color"] for o in objs], "shape": [o["shape"] for o in objs],
          "size": [size_word(o) for o in objs],
          **{k: [np.float32(o[k]) for o in objs] for k in ("x", "y", "r")}}


def partner(color: str, shape: str) -> tuple[str, str]:
  """The object that co-occurs with ``(color, shape)`` in ``cooc`` scenes: the next colour
  and the next shape (cyclically), e.g. red circle -> green square."""
  colors = list(COLORS)
  return (colors[(colors.index(color) + 1) % len(colors)],
          SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)])


def _names(objs: list[dict]) -> set[tuple[str, str]]:
  return {(o["color"], o["shape"]) for o in objs}


def _absent(objs: list[dict], rng: np.random.Generator) -> tuple[str, str]:
  """A uniformly drawn object (colour, shape) that is not in the scene."""
  present = _names(objs)
  choices = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
  return choices[int(rng.integers(len(choices)))]


def add_partner(objs: list[dict], rng: np.random.Generator, p: float) -> list[dict]:
  """With probability ``p``, the scene with the largest object's :func:`partner` in it: it
  takes the place of the second object (its position and size), or joins a lone object at a
  free position. Draws from ``rng`` the same number of times whatever the outcome."""
  u, y, r = rng.random(), rng.uniform(0.18, 0.82), rng.uniform(0.09, 0.17)
  mate = partner(objs[0]["color"], objs[0]["shape"])
  if u >= p or mate in _names(objs):
    return objs
  objs = [dict(o) for o in objs]
  if len(objs) >= 2:
    objs[1].update(color=mate[0], shape=mate[1])
  else:
    away = (float(np.clip(1.0 - objs[0]["x"], 0.18, 0.82)), float(y))
    objs.append({"color": mate[0], "shape": mate[1], "x": away[0], "y": away[1],
                 "r": float(min(r, objs[0]["r"]))})
  objs.sort(key=lambda o: -o["r"])
  return objs


def hallucination_target(objs: list[dict], rng: np.random.Generator) -> tuple[str, str]:
  """The object a co-occurrence prior would wrongly add: the partner of the first present
  object (largest first) whose partner is absent, else a random absent object."""
  present = _names(objs)
  for o in objs:
    mate = partner(o["color"], o["shape"])
    if mate not in present:
      return mate
  return _absent(objs, rng)


def sft_fields(objs: list[dict], rng: np.random.Generator, noise: float) -> dict[str, str]:
  """The ``cooc`` config's SFT fields of a scene (module docstring). A fixed number of draws
  from ``rng`` per scene."""
  u_desc, u_q, u_kind, u_ans = rng.random(size=4)
  xy, r = rng.uniform(0.15, 0.85, size=2), rng.uniform(0.09, 0.17)
  target, other = hallucination_target(objs, rng), _absent(objs, rng)
  fake = None
  if u_desc < noise:
    fake = {"color": target[0], "shape": target[1], "x": float(xy[0]), "y": float(xy[1]),
            "r": float(r)}
  shown = sorted(objs + ([fake] if fake else []), key=lambda o: -o["r"])
  if u_q < 0.5:  # about a present object
    o = objs[int(u_kind * len(objs)) % len(objs)]
    asked, answer, sft = (o["color"], o["shape"]), "yes", "yes"
  else:  # about an absent object: the co-occurring one half of the time
    asked = target if u_kind < 0.5 else other
    answer = "no"
    sft = "yes" if asked == target and u_ans < noise else "no"
  return {"sft_description": describe(shown),
          "hallucinated": f"{fake['color']} {fake['shape']}" if fake else "",
          "question": f"is there a {asked[0]} {asked[1]} in the image ?",
          "answer": answer, "sft_answer": sft}


#: the pre-tokenization of a word-level tokenizer (HF ``Whitespace``): words and punctuation.
WORD_RE = re.compile(r"\w+|[^\w\s]+")


def vocabulary() -> list[str]:
  """Every word or punctuation mark ``captions``, ``canonical_caption`` and ``describe`` can
  produce (lower case), sorted."""
  words = set(COLORS) | set(SHAPES) | set(SIZES) | set(_COUNTS) | {"shape", "shapes"}
  words |= {"a", "single", "there", "is", "picture", "of", "on", "dark", "background", "big",
            "smaller", "and", "left", "right", "above", "below", "at", "the", "top", "bottom",
            "center", ":", ".", ",", "yes", "no", "in", "image", "?"}
  return sorted(words)


def paraphrases(objs: list[dict]) -> list[str]:
  """The NUM_CAPTIONS paraphrases of the scene in a fixed order (the first is
  :func:`canonical_caption`); the largest object is always named first. A function of the
  concept (:func:`concept_key`) only."""
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
  return caps


def captions(objs: list[dict], rng: np.random.Generator) -> list[str]:
  """NUM_CAPTIONS paraphrases of the scene (:func:`paraphrases`), shuffled by ``rng``."""
  caps = paraphrases(objs)
  order = rng.permutation(len(caps))
  return [caps[i] for i in order][:NUM_CAPTIONS]


# --- the equiv configs: re-renderings of a pool of concepts (module docstring) -------------

#: the streams of the ``equiv`` configs (none of them is one of the other configs'):
#: ``[seed, _POOL_STREAM]`` the concept pool, ``[seed, _EVAL_STREAM]`` the eval concepts,
#: ``[seed, split_index, _RENDER_STREAM, i]`` train example ``i``,
#: ``[seed, split_index, _RENDER_STREAM, concept, k]`` rendering ``k`` of an eval concept.
_POOL_STREAM, _EVAL_STREAM, _RENDER_STREAM = 100, 101, 11
#: an ``equiv`` background is BACKGROUND plus a uniform offset in +-this per channel.
BACKGROUND_JITTER = 8.0
#: the supersampling of :func:`render_textured` (odd; fine textures need more than 1).
TEXTURE_SUPERSAMPLE = 3


def concept_key(objs: list[dict]) -> tuple[tuple[tuple[str, str], ...], str]:
  """The concept of a scene: ``((colour, shape) of each object, largest first), relation of
  object 0 to object 1`` (``''`` for one object). Equal keys <=> equal :func:`paraphrases`."""
  names = tuple((o["color"], o["shape"]) for o in objs)
  return names, _relation(objs[0], objs[1])[0] if len(objs) >= 2 else ""


def caption_meaning(caption: str) -> str:
  """A caption up to the order of its trailing ``" and a <object>"`` parts (sorted): two
  captions with the same meaning say the same thing."""
  head, *tail = caption.split(" and a ")
  return " and a ".join([head, *sorted(tail)])


def concept_pool(num: int, seed: int) -> list[list[dict]]:
  """``num`` concepts (scenes of :func:`sample_scene` from ``[seed, _POOL_STREAM]``), in
  order of drawing; a candidate is rejected when a :func:`caption_meaning` of its
  :func:`paraphrases` is one of a pooled concept's (so any two concepts of the pool have
  disjoint caption sets, also up to the order of trailing objects)."""
  rng = np.random.default_rng([seed, _POOL_STREAM])
  pool, taken = [], set()
  for _ in range(1000 * num):
    if len(pool) == num:
      return pool
    objs = sample_scene(rng)
    meanings = {caption_meaning(c) for c in paraphrases(objs)}
    if not meanings & taken:
      taken |= meanings
      pool.append(objs)
  if len(pool) < num:
    raise ValueError(f"found only {len(pool)} distinct concepts, not {num}")
  return pool


def rerender(objs: list[dict], rng: np.random.Generator, max_tries: int = 10_000) -> list[dict]:
  """A new rendering of the concept of ``objs`` (:func:`concept_key` unchanged).

  Radii: ``len(objs)`` draws uniform in [0.09, 0.17] sorted in decreasing order, so object 0
  stays the largest and the size order is kept. Centres: uniform in [0.18, 0.82]^2, placed in
  order with :func:`sample_scene`'s rule (a centre closer than 0.3 to a placed one is redrawn
  with probability 0.9); the whole placement is redrawn until object 0's relation to object 1
  is the concept's (about 4 tries). Textures: per object, uniform of
  ``shapes_fewshot.TEXTURES``, its fill by ``shapes_fewshot.object_fill`` (a jittered colour of
  the name, the pattern's phase, orientation and scale). Returns dicts with ``color``,
  ``shape``, ``x``, ``y``, ``r``, ``texture`` and ``fill`` (for :func:`render_textured`).
  """
  from bigvl.data.builders import shapes_fewshot  # it imports this module: not at the top

  n = len(objs)
  want = concept_key(objs)[1]
  for _ in range(max_tries):
    radii = np.sort(rng.uniform(0.09, 0.17, size=n))[::-1]
    placed: list[dict] = []
    while len(placed) < n:
      x, y = rng.uniform(0.18, 0.82, size=2)
      if not _crowded(x, y, placed, rng):
        placed.append({"x": float(x), "y": float(y)})
    if n < 2 or _relation(placed[0], placed[1])[0] == want:
      break
  else:
    raise RuntimeError(f"no placement with the relation {want!r} in {max_tries} tries")
  out = []
  for o, at, r in zip(objs, placed, radii, strict=True):
    texture = shapes_fewshot.TEXTURES[int(rng.integers(len(shapes_fewshot.TEXTURES)))]
    out.append({"color": o["color"], "shape": o["shape"], **at, "r": float(r),
                "texture": texture,
                "fill": shapes_fewshot.object_fill(o["color"], texture, rng)})
  return out


def equiv_background(rng: np.random.Generator) -> tuple[float, float, float]:
  """An ``equiv`` background colour: BACKGROUND + uniform(-BACKGROUND_JITTER,
  BACKGROUND_JITTER) per channel (RGB floats)."""
  jitter = rng.uniform(-BACKGROUND_JITTER, BACKGROUND_JITTER, size=3)
  return tuple(float(c + j) for c, j in zip(BACKGROUND, jitter, strict=True))


def render_textured(objs: list[dict], size: int, background: tuple[float, float, float],
                    supersample: int = TEXTURE_SUPERSAMPLE) -> np.ndarray:
  """The uint8 image ``[size, size, 3]`` of :func:`rerender` objects (each with its ``fill``)
  on a flat ``background``: ``shapes_segmentation.render_scene``, upright shapes (a square's
  half side 0.85 r, an equilateral triangle), drawn in order (smaller on top). A pure
  function."""
  scene = {"background": {"kind": "flat", "colors": (background, background)},
           "objects": [{"shape": o["shape"], "x": o["x"], "y": o["y"], "r": o["r"],
                        "angle": 0.0, "fill": o["fill"]} for o in objs]}
  return shapes_segmentation.render_scene(scene, size, supersample)[0]


def eval_concepts(cfg: ShapesConfig) -> dict[str, list[int]]:
  """The pool indices of the validation and test concepts of an ``equiv`` config: a
  permutation of the pool from ``[seed, _EVAL_STREAM]``, the first ``num_val / eval_renders``
  for validation, the next ``num_test / eval_renders`` for test (disjoint)."""
  r = cfg.eval_renders
  if r < 1 or cfg.num_val % r or cfg.num_test % r:
    raise ValueError(f"num_val={cfg.num_val} and num_test={cfg.num_test} must be multiples "
                     f"of eval_renders={r}")
  n_val, n_test = cfg.num_val // r, cfg.num_test // r
  if n_val + n_test > cfg.num_concepts:
    raise ValueError(f"{n_val} + {n_test} eval concepts do not fit a pool of "
                     f"{cfg.num_concepts}")
  order = [int(c) for c in np.random.default_rng([cfg.seed, _EVAL_STREAM]).permutation(
      cfg.num_concepts)]
  return {"validation": order[:n_val], "test": order[n_val:n_val + n_test]}


def equiv_example(concept: list[dict], index: int, rng: np.random.Generator,
                  size: int) -> dict:
  """An ``equiv`` example: a rendering of ``concept`` (pool index ``index``), all drawn from
  ``rng``: :func:`rerender`, :func:`equiv_background`, then ``captions``' shuffle."""
  objs = rerender(concept, rng)
  image = render_textured(objs, size, equiv_background(rng))
  return {"image": image,
          "captions": captions(objs, rng),
          "label": CLASS_NAMES.index(f"{objs[0]['color']} {objs[0]['shape']}"),
          "scene_id": index, "concept": index,
          "caption": canonical_caption(objs), "description": describe(objs),
          "objects": {**scene_graph(objs), "texture": [o["texture"] for o in objs]}}


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Synthetic coloured-shapes scenes with generated captions (see module docstring)."""

  VERSION = tfds.core.Version("1.2.0")
  #: older versions ``tfds.builder(..., version=...)`` still prepares, bitwise.
  SUPPORTED_VERSIONS = [tfds.core.Version("1.1.0")]
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "dups: 100 prototypes for half of the train scenes; clean eval splits.",
                   "1.2.0": "caption, description and objects (the scene graph); the 1.1.0 "
                            "fields are unchanged. Later, new configs only (the others' "
                            "examples unchanged): equiv, equiv_small (concepts re-rendered)."}

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    # TFDS prepares only the canonical (newest) version, lest old versions be generated by
    # newer code that changed them. Here every version is generated by this code (branching on
    # ``self.version``, tested bitwise against 1.1.0), so the requested version is canonical.
    self.__dict__["canonical_version"] = self.version  # the functools.cached_property's slot
    if self.builder_config.num_concepts > 0 and not self._has_scene_graph:
      raise ValueError(f"config {self.builder_config.name!r} needs version >= 1.2.0, got "
                       f"{self.version}")

  @property
  def _has_scene_graph(self) -> bool:
    """Whether this version has ``caption``, ``description`` and ``objects`` (>= 1.2.0)."""
    return self.version >= "1.2.0"
  @property
  def _has_sft(self) -> bool:
    """Whether the config has the SFT fields (``cooccur > 0``: ``cooc``)."""
    return self._has_scene_graph and self.builder_config.cooccur > 0
  @property
  def _has_equiv(self) -> bool:
    """Whether the config re-renders a concept pool (``num_concepts > 0``: ``equiv``)."""
    return self._has_scene_graph and self.builder_config.num_concepts > 0

  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="independent random scenes"),
      ShapesConfig(name="dups", description="half the train scenes copy 100 prototypes",
                   num_prototypes=100, dup_fraction=0.5),
      ShapesConfig(name="small", description="a small copy for tests", num_train=512,
                   num_val=64, num_test=128),
      ShapesConfig(name="cooc", description="co-occurring objects and a hallucinating SFT pool "
                   "(CLIP-DPO)", num_train=10_000, num_val=500, num_test=500, cooccur=0.7,
                   sft_noise=0.3),
      ShapesConfig(name="cooc_small", description="a small cooc for tests", num_train=512,
                   num_val=64, num_test=128, cooccur=0.7, sft_noise=0.3),
      ShapesConfig(name="equiv", description="re-renderings of a pool of 300 concepts: "
                   "equivalent pairs (FFF's false negatives)", num_train=20_000, num_val=500,
                   num_test=1_000, num_concepts=300, eval_renders=5),
      ShapesConfig(name="equiv_small", description="a small equiv for tests", num_train=512,
                   num_val=64, num_test=128, num_concepts=48, eval_renders=4),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    features = {
        "image": tfds.features.Image(shape=(size, size, 3)),
        "captions": tfds.features.Sequence(tfds.features.Text(), length=NUM_CAPTIONS),
        "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        "scene_id": np.int64,
    }
    if self._has_scene_graph:
      text = tfds.features.Text()
      objects = {"color": text, "shape": text, "size": text, "x": np.float32, "y": np.float32,
                 "r": np.float32}
      if self._has_equiv:
        objects["texture"] = text
      features.update({
          "caption": text,
          "description": text,
          "objects": tfds.features.Sequence(objects),
      })
    if self._has_equiv:
      features["concept"] = np.int64
    if self._has_sft:
      features.update({k: tfds.features.Text() for k in SFT_FIELDS})
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/bigvl",
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    return png_splits({"train": self._generate_examples("train", cfg.num_train, 0),
                       "validation": self._generate_examples("validation", cfg.num_val, 1),
                       "test": self._generate_examples("test", cfg.num_test, 2)},
                      self.info.features)

  def _generate_examples(self, split: str, n: int, split_index: int):
    if self._has_equiv:
      yield from self._generate_equiv(split, n, split_index)
      return
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
      if self._has_sft:  # its own generator: the scenes' draws above stay as without it
        srng = np.random.default_rng([cfg.seed, split_index, 7, i])
        objs = add_partner(objs, srng, cfg.cooccur)
      example = {"image": render(objs, cfg.image_size),
                 "captions": captions(objs, rng),
                 "label": CLASS_NAMES.index(f"{objs[0]['color']} {objs[0]['shape']}"),
                 "scene_id": scene_id}
      if self._has_scene_graph:  # no random draws: the fields above stay as in 1.1.0
        example.update(caption=canonical_caption(objs), description=describe(objs),
                       objects=scene_graph(objs))
      if self._has_sft:
        example.update(sft_fields(objs, srng, cfg.sft_noise))
      yield i, example

  def _generate_equiv(self, split: str, n: int, split_index: int):
    """The ``equiv`` examples (module docstring): train example ``i`` draws its concept and
    rendering from ``[seed, 0, _RENDER_STREAM, i]``; eval example ``i`` is rendering ``k = i %
    eval_renders`` of concept ``eval_concepts(cfg)[split][i // eval_renders]``, drawn from
    ``[seed, split_index, _RENDER_STREAM, concept, k]``."""
    cfg = self.builder_config
    pool = concept_pool(cfg.num_concepts, cfg.seed)
    concepts = None if split == "train" else eval_concepts(cfg)[split]
    for i in range(n):
      if concepts is None:
        rng = np.random.default_rng([cfg.seed, split_index, _RENDER_STREAM, i])
        c = int(rng.integers(len(pool)))
      else:
        c, k = concepts[i // cfg.eval_renders], i % cfg.eval_renders
        rng = np.random.default_rng([cfg.seed, split_index, _RENDER_STREAM, c, k])
      yield i, equiv_example(pool[c], c, rng, cfg.image_size)
