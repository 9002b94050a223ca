"""Hard-negative captions from a scene graph, and SugarCrepe-format files.

Compositionality benchmarks ask whether an image-text model prefers an image's true caption to
a *hard negative*: a caption made of the same words that differs in exactly one compositional
element. ARO (Yuksekgonul et al., "When and why vision-language models behave like
bags-of-words", ICLR 2023) swaps attributes or the order of objects and relations; SugarCrepe
(Hsieh et al., "SugarCrepe: Fixing Hackable Benchmarks for Vision-Language Compositionality",
NeurIPS 2023) replaces, swaps or adds objects, attributes and relations with fluent text, since
ungrammatical negatives can be rejected by a text-only model. A model whose text embedding is
a bag of words scores chance (ties) on swaps: the swapped caption has the same words.

For ``shapes_captions`` (>= 1.2.0, whose examples carry the scene graph ``objects``) the
negatives are made from the scene graph itself, in the dataset's own caption grammar
(``shapes_captions.canonical_caption``: ``"a <colour> <shape> <relation> a <colour> <shape>
[and a <colour> <shape>]..."``, largest object first, the relation of the first to the second
by ``shapes_captions._relation``), so they use only the dataset's vocabulary:

* ``swap_attribute``: the colours of two objects with different colours swapped ("a red
  circle left of a blue square" -> "a blue circle left of a red square"). The captions carry
  no sizes (only the "big ... smaller" paraphrase does, in a fixed order), so colour is the
  attribute.
* ``swap_object``: the shapes (nouns) of two objects with different shapes swapped ("a red
  square left of a blue circle").
* ``replace_relation``: the relation replaced by its opposite ("left of" <-> "right of",
  "above" <-> "below").

A negative is kept only if it is **false for the scene** (:func:`caption_holds`, checked
against the scene graph: a swap can describe the scene when other objects match the swapped
names) and names distinct objects, as every caption of the dataset does (a negative naming one
object twice would be recognisable from the text alone). "False" is strict: the stated
relation must not hold even loosely (``"left of"`` when the first object is left of the second
at all, whatever the larger offset), so no negative is arguably true. Scenes where a type is
impossible (one object; all colours equal; ...) just lack it. Everything here is a pure,
deterministic function of the scene graph.

:func:`load_sugarcrepe` reads the SugarCrepe release (one json file per negative type) for
evaluating real models on real images.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bigvl.data.builders import shapes_captions as sc

#: the negative types made from a scene graph, in reporting order.
NEGATIVE_TYPES = ("swap_attribute", "swap_object", "replace_relation")
#: each spatial relation's opposite (the dataset's relations).
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
#: SugarCrepe's file names (negative types) -> this module's names where they agree.
SUGARCREPE_TYPES = {"swap_att": "swap_attribute", "swap_obj": "swap_object",
                    "replace_rel": "replace_relation"}

Mention = tuple[str, str]  # (colour, shape)
Negative = tuple[str, str]  # (type, text)


def _text(v: Any) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)


def scene_objects(objects: Mapping[str, Sequence[Any]]) -> list[dict]:
  """The ``objects`` feature (parallel lists ``color``, ``shape``, ``x``, ``y``, ``r``, ...;
  str or bytes, numpy or Python) -> the builder's object dicts, in the same order (largest
  first)."""
  colors = [_text(c) for c in objects["color"]]
  shapes = [_text(s) for s in objects["shape"]]
  n = len(colors)
  out = [{"color": colors[i], "shape": shapes[i]} for i in range(n)]
  for key in ("x", "y", "r"):
    if key in objects:
      for o, v in zip(out, objects[key], strict=True):
        o[key] = float(v)
  return out


def true_caption(objs: Sequence[dict]) -> str:
  """The scene's caption in the dataset's grammar: ``shapes_captions.canonical_caption``."""
  return sc.canonical_caption(list(objs))


def _caption(mentions: Sequence[Mention], relation: str | None) -> str:
  """The canonical grammar for given mentions and relation (the builder's
  ``canonical_caption`` with the names and relation supplied instead of derived)."""
  name = [f"{c} {s}" for c, s in mentions]
  if len(name) == 1:
    return f"a {name[0]}"
  return f"a {name[0]} {relation} a {name[1]}" + "".join(f" and a {n}" for n in name[2:])


def parse_caption(text: str) -> tuple[list[Mention], str | None]:
  """Inverse of the canonical grammar: ``"a red circle left of a blue square and a green
  star"`` -> ``([('red', 'circle'), ('blue', 'square'), ('green', 'star')], 'left of')``.
  Raises ValueError on a text outside the grammar."""
  words = text.split()
  mentions: list[Mention] = []
  relation = None
  i = 0
  while i < len(words):
    if words[i] != "a" or i + 2 >= len(words):
      raise ValueError(f"not a canonical shapes caption: {text!r}")
    color, shape = words[i + 1], words[i + 2]
    if color not in sc.COLORS or shape not in sc.SHAPES:
      raise ValueError(f"not a canonical shapes caption: {text!r}")
    mentions.append((color, shape))
    i += 3
    if i == len(words):
      break
    if len(mentions) == 1:
      two = " ".join(words[i:i + 2])
      if two in OPPOSITE:
        relation, i = two, i + 2
      elif words[i] in OPPOSITE:
        relation, i = words[i], i + 1
      else:
        raise ValueError(f"not a canonical shapes caption: {text!r}")
    elif words[i] == "and":
      i += 1
    else:
      raise ValueError(f"not a canonical shapes caption: {text!r}")
  if (len(mentions) > 1) != (relation is not None):
    raise ValueError(f"not a canonical shapes caption: {text!r}")
  return mentions, relation


def relation_holds(a: dict, b: dict, relation: str, loose: bool = True) -> bool:
  """Whether ``a <relation> b``: strictly, the dataset's relation (``_relation``: by the
  larger of the offsets); loosely, the offset along the relation's axis has its sign
  (``"left of"``: ``a`` is left of ``b`` at all)."""
  if not loose:
    return sc._relation(a, b)[0] == relation  # the builder's own rule
  dx, dy = b["x"] - a["x"], b["y"] - a["y"]
  return {"left of": dx > 0, "right of": dx < 0, "above": dy > 0, "below": dy < 0}[relation]


def caption_holds(text: str, objs: Sequence[dict], loose: bool = True) -> bool:
  """Whether a caption of the canonical grammar is true for the scene: every named object is
  in the scene (objects are unique by colour and shape) and the first stands in the stated
  relation to the second (:func:`relation_holds`; loosely by default, so a negative must be
  false even for the lenient reading). The order of the trailing "and a ..." objects carries
  no meaning."""
  mentions, relation = parse_caption(text)
  by_name = {(o["color"], o["shape"]): o for o in objs}
  if not all(m in by_name for m in mentions):
    return False
  if relation is None:
    return True
  return relation_holds(by_name[mentions[0]], by_name[mentions[1]], relation, loose)


def _keep(text: str, truth: str, objs: Sequence[dict]) -> bool:
  mentions, _ = parse_caption(text)
  return (text != truth and len(set(mentions)) == len(mentions)
          and not caption_holds(text, objs, loose=True))


def _swaps(objs: Sequence[dict], field: str) -> list[str]:
  truth = true_caption(objs)
  _, relation = parse_caption(truth)
  out = []
  for i, j in itertools.combinations(range(len(objs)), 2):
    if objs[i][field] == objs[j][field]:
      continue
    swapped = [dict(o) for o in objs]
    swapped[i][field], swapped[j][field] = objs[j][field], objs[i][field]
    text = _caption([(o["color"], o["shape"]) for o in swapped], relation)
    if _keep(text, truth, objs):
      out.append(text)
  return out


def swap_attribute(objs: Sequence[dict]) -> list[str]:
  """Every valid colour swap of two objects with different colours, pairs in order
  ``(0, 1), (0, 2), ..., (1, 2), ...`` (the related pair first)."""
  return _swaps(objs, "color")


def swap_object(objs: Sequence[dict]) -> list[str]:
  """Every valid shape swap of two objects with different shapes, pairs in the same order."""
  return _swaps(objs, "shape")


def replace_relation(objs: Sequence[dict]) -> list[str]:
  """The caption with its relation replaced by the opposite (none for a single object)."""
  if len(objs) < 2:
    return []
  truth = true_caption(objs)
  mentions, relation = parse_caption(truth)
  text = _caption(mentions, OPPOSITE[relation])
  return [text] if _keep(text, truth, objs) else []


_MAKERS = {"swap_attribute": swap_attribute, "swap_object": swap_object,
           "replace_relation": replace_relation}


def hard_negatives(objects: Mapping[str, Sequence[Any]] | Sequence[dict],
                   max_per_type: int | None = 1,
                   types: Iterable[str] = NEGATIVE_TYPES) -> list[Negative]:
  """``[(type, text)]`` for one scene (the ``objects`` feature or builder object dicts): at
  most ``max_per_type`` negatives of each type (None: all), in :data:`NEGATIVE_TYPES` order.
  One per type (the default) weighs every image equally, as SugarCrepe pairs one negative
  with one image-caption pair."""
  objs = scene_objects(objects) if isinstance(objects, Mapping) else list(objects)
  out: list[Negative] = []
  for t in types:
    if t not in _MAKERS:
      raise ValueError(f"unknown negative type {t!r}; known: {', '.join(NEGATIVE_TYPES)}")
    texts = _MAKERS[t](objs)
    out += [(t, x) for x in (texts if max_per_type is None else texts[:max_per_type])]
  return out


def load_sugarcrepe(json_path: str, image_root: str) -> list[dict]:
  """SugarCrepe's files -> ``[{'image_path', 'caption', 'negatives': [(type, text)]}]``.

  ``json_path``: one file or a directory of them (``*.json``, read in name order), each
  ``{id: {"filename", "caption", "negative_caption"}}`` for one negative type, the file's
  stem (``swap_obj.json`` ...; :data:`SUGARCREPE_TYPES` renames the three this module also
  makes, the others keep their names). Entries of the same image and caption are merged into
  one record, in first-seen order; ``image_path`` is ``image_root/filename``.
  """
  if os.path.isdir(json_path):
    files = sorted(glob.glob(os.path.join(json_path, "*.json")))
    if not files:
      raise FileNotFoundError(f"no *.json files in {json_path}")
  else:
    files = [json_path]
  records: dict[tuple[str, str], dict] = {}
  for path in files:
    stem = os.path.splitext(os.path.basename(path))[0]
    kind = SUGARCREPE_TYPES.get(stem, stem)
    with open(path) as f:
      entries = json.load(f)
    items = entries.items() if isinstance(entries, dict) else enumerate(entries)
    for key, e in items:
      try:
        filename, caption, negative = e["filename"], e["caption"], e["negative_caption"]
      except (KeyError, TypeError):
        raise ValueError(f"{path}: entry {key!r} lacks filename / caption / "
                         f"negative_caption") from None
      rec = records.setdefault((filename, caption), {
          "image_path": os.path.join(image_root, filename), "caption": caption,
          "negatives": []})
      rec["negatives"].append((kind, negative))
  return list(records.values())
