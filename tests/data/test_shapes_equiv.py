"""shapes_captions' ``equiv`` configs: re-renderings of a pool of concepts. Same concept <=>
same caption set, yet different images (positions, radii, textures); deterministic."""

import collections
import itertools

import numpy as np
import pytest

from bigvl.data import sources
from bigvl.data.builders import shapes_captions as sc
from bigvl.data.builders import shapes_fewshot

NAME = "shapes_captions/equiv_small"
CFG = next(c for c in sc.ShapesCaptions.BUILDER_CONFIGS if c.name == "equiv_small")
SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def equiv_dir(shapes_data_dir):
  """The session's data dir, with ``shapes_captions/equiv_small`` prepared once in it."""
  sources.tfds_builder(NAME, shapes_data_dir)
  return shapes_data_dir


def _load(root: str, split: str) -> list[dict]:
  """Every example of the split, texts decoded, ``objs`` the scene graph as a list of
  dicts."""
  src, _ = sources.get_source(NAME, split, root)
  out = []
  for i in range(len(src)):
    ex = src[i]
    o = ex["objects"]
    objs = [{"color": c.decode(), "shape": s.decode(), "texture": t.decode(), "x": float(x),
             "y": float(y), "r": float(r)}
            for c, s, t, x, y, r in zip(o["color"], o["shape"], o["texture"], o["x"], o["y"],
                                        o["r"], strict=True)]
    out.append({"image": np.asarray(ex["image"]), "concept": int(ex["concept"]),
                "scene_id": int(ex["scene_id"]), "label": int(ex["label"]),
                "captions": [c.decode() for c in ex["captions"]],
                "caption": ex["caption"].decode(), "objs": objs})
  return out


@pytest.fixture(scope="module")
def data(equiv_dir):
  return {split: _load(equiv_dir, split) for split in SPLITS}


def _by_concept(examples: list[dict]) -> dict[int, list[dict]]:
  groups = collections.defaultdict(list)
  for ex in examples:
    groups[ex["concept"]].append(ex)
  return groups


def test_builds_deterministically_in_two_data_dirs(data, tmp_path):
  for split in SPLITS:
    again = _load(str(tmp_path), split)  # prepared again from scratch
    assert len(again) == len(data[split]) == {"train": 512, "validation": 64,
                                              "test": 128}[split]
    for x, y in zip(data[split], again, strict=True):
      np.testing.assert_array_equal(x["image"], y["image"])
      assert x["captions"] == y["captions"] and x["concept"] == y["concept"]
      assert x["objs"] == y["objs"]


def test_features_and_other_configs_unchanged(equiv_dir, shapes_data_dir):
  _, info = sources.get_source(NAME, "test", equiv_dir)
  assert set(info.features) == {"image", "captions", "label", "scene_id", "caption",
                                "description", "objects", "concept"}
  assert set(info.features["objects"].feature) == {"color", "shape", "size", "texture", "x",
                                                   "y", "r"}
  _, small = sources.get_source("shapes_captions/small", "test", shapes_data_dir)
  assert "concept" not in small.features and "texture" not in small.features["objects"].feature
  with pytest.raises(ValueError, match="1.2.0"):
    sc.ShapesCaptions(config="equiv_small", data_dir=equiv_dir, version="1.1.0")


def test_same_concept_same_captions_different_images(data):
  """Ground truth: same concept <=> same caption set; renderings differ in pixels."""
  for split in SPLITS:
    groups = _by_concept(data[split])
    sets = {}
    for c, exs in groups.items():
      first = exs[0]
      key = sc.concept_key(first["objs"])
      for ex in exs:
        assert ex["scene_id"] == c
        assert set(ex["captions"]) == set(first["captions"]) == set(sc.paraphrases(ex["objs"]))
        assert ex["caption"] == first["caption"]
        assert sc.concept_key(ex["objs"]) == key  # (colour, shape) in order, the relation
        assert ex["label"] == sc.CLASS_NAMES.index(" ".join(key[0][0]))
      for a, b in itertools.combinations(exs, 2):
        assert not np.array_equal(a["image"], b["image"])
      sets[c] = {sc.caption_meaning(s) for s in first["captions"]}
    for a, b in itertools.combinations(sets, 2):  # disjoint, even up to the tail's order
      assert not sets[a] & sets[b], (a, b)


def test_eval_concepts_come_from_the_pool(data):
  pool = sc.concept_pool(CFG.num_concepts, CFG.seed)
  want = sc.eval_concepts(CFG)
  assert len(want["validation"]) == 64 // CFG.eval_renders
  assert len(want["test"]) == 128 // CFG.eval_renders
  assert not set(want["validation"]) & set(want["test"])
  for split in SPLITS:
    groups = _by_concept(data[split])
    for c, exs in groups.items():
      assert 0 <= c < CFG.num_concepts
      assert sc.concept_key(exs[0]["objs"]) == sc.concept_key(pool[c])
    if split != "train":
      assert sorted(groups) == sorted(want[split])
      assert {len(exs) for exs in groups.values()} == {CFG.eval_renders}
  train = [ex["concept"] for ex in data["train"]]
  assert len(set(train)) > 0.9 * CFG.num_concepts  # uniform draws cover the pool


def test_pool_rejects_overlapping_caption_sets():
  pool = sc.concept_pool(300, 0)
  keys = [sc.concept_key(p) for p in pool]
  assert len(set(keys)) == 300
  seen = set()
  for objs in pool:
    meanings = {sc.caption_meaning(c) for c in sc.paraphrases(objs)}
    assert len(meanings) == sc.NUM_CAPTIONS and not meanings & seen
    seen |= meanings
  # "a blue square right of a red circle" from both size orders: overlapping sets
  a = [{"color": "blue", "shape": "square", "x": 0.8, "y": 0.5, "r": 0.15},
       {"color": "red", "shape": "circle", "x": 0.2, "y": 0.5, "r": 0.1}]
  b = [dict(a[1], r=0.15), dict(a[0], r=0.1)]
  assert sc.concept_key(a) != sc.concept_key(b)
  assert set(sc.paraphrases(a)) & set(sc.paraphrases(b))
  assert sc.caption_meaning("a red circle left of a blue star and a white star and a red star") \
      == sc.caption_meaning("a red circle left of a blue star and a red star and a white star")


def test_rerender_keeps_the_concept_and_moves_everything_else():
  rng = np.random.default_rng(5)
  for _ in range(200):
    objs = sc.sample_scene(rng)
    new = sc.rerender(objs, rng)
    assert sc.concept_key(new) == sc.concept_key(objs)
    radii = [o["r"] for o in new]
    assert radii == sorted(radii, reverse=True)
    assert {o["texture"] for o in new} <= set(shapes_fewshot.TEXTURES)
    assert all(abs(o["x"] - p["x"]) + abs(o["y"] - p["y"]) > 0 for o, p in zip(new, objs,
                                                                                strict=True))


def _foreground(image: np.ndarray) -> np.ndarray:
  """Pixels unlike the background (the corner pixel) by more than 30 in some channel."""
  return (np.abs(image.astype(int) - image[0, 0].astype(int)) > 30).any(-1)


def test_renderings_differ_in_geometry_and_texture(data):
  """Not the same picture re-noised: the pixel distance between two renderings of a concept is
  about that between different concepts' images, their object masks overlap little, and the
  objects' positions, radii and textures vary within a concept."""
  test = data["test"]
  imgs = np.stack([ex["image"] for ex in test]).astype(np.float64).reshape(len(test), -1)
  dist = np.sqrt(((imgs[:, None] - imgs[None]) ** 2).sum(-1))
  c = np.array([ex["concept"] for ex in test])
  same = (c[:, None] == c[None]) & ~np.eye(len(c), dtype=bool)
  assert dist[same].mean() > 0.75 * dist[c[:, None] != c[None]].mean()
  ious, spread, textures = [], [], []
  for exs in _by_concept(test).values():
    for a, b in itertools.combinations(exs, 2):
      fa, fb = _foreground(a["image"]), _foreground(b["image"])
      ious.append((fa & fb).sum() / max((fa | fb).sum(), 1))
    spread.append(np.std([[ex["objs"][0][k] for k in ("x", "y", "r")] for ex in exs], 0))
    textures.append(len({tuple(o["texture"] for o in ex["objs"]) for ex in exs}))
  assert np.mean(ious) < 0.4
  assert (np.mean(spread, 0) > [0.08, 0.08, 0.01]).all()
  assert np.mean(np.array(textures) > 1) > 0.9
  assert {o["texture"] for ex in test for o in ex["objs"]} == set(shapes_fewshot.TEXTURES)
