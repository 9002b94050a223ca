"""Hard negatives from the shapes_captions scene graph: each differs from the true caption in
exactly one element of its type, is false for the scene (checked here independently of the
module's own check), uses only the dataset's vocabulary, and is deterministic; plus the
SugarCrepe file loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bigvl.data import hard_negatives as hn
from bigvl.data.builders import shapes_captions as sc

VOCAB = set(sc.vocabulary())
COLOR_WORDS, SHAPE_WORDS = set(sc.COLORS), set(sc.SHAPES)


def _scenes(n: int = 400, seed: int = 0) -> list[dict]:
  """Scene graphs as the dataset stores them (float32 positions)."""
  rng = np.random.default_rng(seed)
  return [sc.scene_graph(sc.sample_scene(rng)) for _ in range(n)]


def _true_for_scene(text: str, graph: dict) -> bool:
  """An independent reading of a caption against the scene graph: every "<colour> <shape>"
  names an object of the scene, and the relation between the first two named objects is the
  dataset's (larger offset decides; y grows downwards)."""
  words = text.split()
  named = [(a, b) for a, b in zip(words, words[1:], strict=False)
           if a in COLOR_WORDS and b in SHAPE_WORDS]
  objs = {(str(c), str(s)): (float(x), float(y)) for c, s, x, y in
          zip(graph["color"], graph["shape"], graph["x"], graph["y"], strict=True)}
  if any(m not in objs for m in named):
    return False
  if len(named) < 2:
    return True
  (x0, y0), (x1, y1) = objs[named[0]], objs[named[1]]
  dx, dy = x1 - x0, y1 - y0
  if abs(dx) >= abs(dy):
    actual = "left" if dx > 0 else "right"
  else:
    actual = "above" if dy > 0 else "below"
  stated = next(w for w in words if w in ("left", "right", "above", "below"))
  return stated == actual


def _diff(a: str, b: str) -> list[int]:
  ta, tb = a.split(), b.split()
  assert len(ta) == len(tb), (a, b)
  return [i for i, (x, y) in enumerate(zip(ta, tb, strict=True)) if x != y]


def test_true_caption_is_the_dataset_caption_and_true():
  rng = np.random.default_rng(1)
  for _ in range(200):
    objs = sc.sample_scene(rng)
    graph = sc.scene_graph(objs)
    truth = hn.true_caption(hn.scene_objects(graph))
    assert truth == sc.canonical_caption(objs)
    assert _true_for_scene(truth, graph)
    assert hn.caption_holds(truth, hn.scene_objects(graph), loose=False)


def test_each_negative_differs_in_exactly_its_one_element_and_is_false():
  counts = dict.fromkeys(hn.NEGATIVE_TYPES, 0)
  for graph in _scenes():
    truth = hn.true_caption(hn.scene_objects(graph)).split()
    for kind, text in hn.hard_negatives(graph, max_per_type=None):
      counts[kind] += 1
      tokens = text.split()
      assert set(tokens) <= VOCAB and set(sc.WORD_RE.findall(text)) <= VOCAB, text
      assert not _true_for_scene(text, graph), (kind, text)
      d = _diff(" ".join(truth), text)
      if kind == "replace_relation":
        assert len(d) == 1, text
        assert {truth[d[0]], tokens[d[0]]} in ({"left", "right"}, {"above", "below"})
      else:
        words = COLOR_WORDS if kind == "swap_attribute" else SHAPE_WORDS
        assert len(d) == 2, (kind, text)
        i, j = d
        assert truth[i] in words and truth[j] in words
        assert (tokens[i], tokens[j]) == (truth[j], truth[i])  # swapped, nothing else
      # as in every caption of the dataset, no object is named twice
      names = [(a, b) for a, b in zip(tokens, tokens[1:], strict=False) if b in SHAPE_WORDS]
      assert len(set(names)) == len(names)
  assert all(c > 100 for c in counts.values()), counts


def test_types_are_present_exactly_when_possible():
  for graph in _scenes(300, seed=2):
    objs = hn.scene_objects(graph)
    got = {k for k, _ in hn.hard_negatives(graph, max_per_type=None)}
    n = len(objs)
    assert ("replace_relation" in got) == (n >= 2)  # the opposite relation is never true
    if len({o["color"] for o in objs}) < 2:
      assert "swap_attribute" not in got
    if len({o["shape"] for o in objs}) < 2:
      assert "swap_object" not in got
    if n == 2:  # two objects: a swap is possible iff the swapped field differs
      assert ("swap_attribute" in got) == (objs[0]["color"] != objs[1]["color"])
      assert ("swap_object" in got) == (objs[0]["shape"] != objs[1]["shape"])


def _obj(color, shape, x, y, r):
  return {"color": color, "shape": shape, "x": x, "y": y, "r": r}


def test_the_examples_of_the_brief():
  objs = [_obj("red", "circle", 0.2, 0.5, 0.16), _obj("blue", "square", 0.8, 0.55, 0.12)]
  assert hn.true_caption(objs) == "a red circle left of a blue square"
  assert hn.hard_negatives(objs) == [
      ("swap_attribute", "a blue circle left of a red square"),
      ("swap_object", "a red square left of a blue circle"),
      ("replace_relation", "a red circle right of a blue square")]
  assert hn.hard_negatives([objs[0]]) == []  # one object: no type is possible


def test_a_swap_that_describes_the_scene_is_discarded():
  # red circle (largest) above-left of a blue square; a green circle left of that square.
  objs = [_obj("red", "circle", 0.5, 0.2, 0.17), _obj("blue", "square", 0.8, 0.5, 0.15),
          _obj("green", "circle", 0.2, 0.5, 0.10)]
  truth = hn.true_caption(objs)
  assert truth == "a red circle left of a blue square and a green circle"
  swapped = "a green circle left of a blue square and a red circle"  # colours of 0 and 2
  assert hn.caption_holds(swapped, objs) and _true_for_scene(swapped, sc.scene_graph(objs))
  texts = hn.swap_attribute(objs)
  assert swapped not in texts
  assert texts[0] == "a blue circle left of a red square and a green circle"


def test_deterministic_and_scene_graph_encodings_agree():
  graphs = _scenes(50, seed=3)
  a = [hn.hard_negatives(g, None) for g in graphs]
  b = [hn.hard_negatives(g, None) for g in _scenes(50, seed=3)]
  assert a == b
  as_bytes = [{**g, "color": np.asarray([c.encode() for c in g["color"]], object),
               "shape": np.asarray([s.encode() for s in g["shape"]], object),
               **{k: np.asarray(g[k], np.float32) for k in ("x", "y", "r")}} for g in graphs]
  assert [hn.hard_negatives(g, None) for g in as_bytes] == a
  assert [hn.hard_negatives(g) for g in graphs] == [
      [next(x for x in neg if x[0] == t) for t in hn.NEGATIVE_TYPES if any(
          y[0] == t for y in neg)] for neg in a]  # max_per_type=1: each type's first


def test_parse_caption_roundtrip_and_rejects_other_text():
  assert hn.parse_caption("a red circle left of a blue square and a green star") == (
      [("red", "circle"), ("blue", "square"), ("green", "star")], "left of")
  assert hn.parse_caption("a white star") == ([("white", "star")], None)
  for bad in ("a red circle beside a blue square", "red circle", "a red circle left of",
              "a big red circle above a blue star", "a red circle and a blue star"):
    with pytest.raises(ValueError):
      hn.parse_caption(bad)


def test_load_sugarcrepe(tmp_path):
  from PIL import Image

  root = tmp_path / "images"
  root.mkdir()
  for name in ("a.png", "b.png"):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / name)
  files = {"swap_att.json": {"0": {"filename": "a.png", "caption": "a red cat",
                                   "negative_caption": "a cat red"},
                             "1": {"filename": "b.png", "caption": "a dog on a mat",
                                   "negative_caption": "a mat on a dog"}},
           "add_obj.json": {"7": {"filename": "a.png", "caption": "a red cat",
                                  "negative_caption": "a red cat and a bird"}}}
  sdir = tmp_path / "sugarcrepe"
  sdir.mkdir()
  for name, content in files.items():
    (sdir / name).write_text(json.dumps(content))
  got = hn.load_sugarcrepe(str(sdir), str(root))
  # files in name order: add_obj first; entries of the same image and caption merge.
  assert got == [
      {"image_path": str(root / "a.png"), "caption": "a red cat",
       "negatives": [("add_obj", "a red cat and a bird"), ("swap_attribute", "a cat red")]},
      {"image_path": str(root / "b.png"), "caption": "a dog on a mat",
       "negatives": [("swap_attribute", "a mat on a dog")]}]
  one = hn.load_sugarcrepe(str(sdir / "swap_att.json"), str(root))
  assert [r["negatives"] for r in one] == [[("swap_attribute", "a cat red")],
                                          [("swap_attribute", "a mat on a dog")]]
  (sdir / "bad.json").write_text(json.dumps({"0": {"filename": "a.png"}}))
  with pytest.raises(ValueError, match="negative_caption"):
    hn.load_sugarcrepe(str(sdir), str(root))
