"""The shapes_captions TFDS builder: deterministic from its seed, captions true to the scene."""

import numpy as np
import pytest

from bigvl.data import sources
from bigvl.data.builders import shapes_captions as sc


def _examples(root, split, n=40):
  src, info = sources.get_source("shapes_captions/small", split, root)
  return [src[i] for i in range(n)], info


def test_builds_deterministically_in_two_data_dirs(shapes_data_dir, tmp_path):
  a, info = _examples(shapes_data_dir, "train")
  b, _ = _examples(str(tmp_path), "train")  # prepared again from scratch
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
    assert list(x["captions"]) == list(y["captions"])
    assert x["label"] == y["label"]
  assert info.splits["train"].num_examples == 512
  assert info.splits["test"].num_examples == 128
  assert info.features["label"].names == list(sc.CLASS_NAMES)


def test_splits_differ_and_captions_name_the_labelled_object(shapes_data_dir):
  train, info = _examples(shapes_data_dir, "train")
  test, _ = _examples(shapes_data_dir, "test")
  assert not np.array_equal(train[0]["image"], test[0]["image"])
  names = info.features["label"].names
  for ex in train:
    main = names[ex["label"]]
    caps = [c.decode() for c in ex["captions"]]
    assert len(caps) == sc.NUM_CAPTIONS
    assert all(main in c for c in caps), (main, caps)


def test_rendered_colours_match_the_scene():
  rng = np.random.default_rng(0)
  objs = [{"color": "red", "shape": "square", "x": 0.5, "y": 0.5, "r": 0.2}]
  img = sc.render(objs, 32)
  assert tuple(img[16, 16]) == sc.COLORS["red"]
  assert tuple(img[1, 1]) == (15, 15, 25)  # background
  caps = sc.captions(objs, rng)
  assert "a red square" in caps


@pytest.mark.parametrize("a_x, b_x, rel", [(0.2, 0.8, "left of"), (0.8, 0.2, "right of")])
def test_relation(a_x, b_x, rel):
  a = {"x": a_x, "y": 0.5}
  b = {"x": b_x, "y": 0.5}
  assert sc._relation(a, b)[0] == rel


def test_dups_copies_prototypes_in_train_only(tmp_path):
  """``dups``-style config: about ``dup_fraction`` of the train scenes are jittered copies of
  the prototypes (same captions up to jitter), the eval splits hold only independent scenes."""
  cfg = sc.ShapesConfig(name="t", num_train=300, num_test=100, num_prototypes=10,
                        dup_fraction=0.5)
  b = sc.ShapesCaptions(config=cfg, data_dir=str(tmp_path))
  train = [ex for _, ex in b._generate_examples("train", cfg.num_train, 0)]
  scene = np.array([ex["scene_id"] for ex in train])
  copies = scene < cfg.num_prototypes
  assert 0.4 < copies.mean() < 0.6
  assert len(set(scene[~copies])) == (~copies).sum()  # fresh scenes have unique ids
  # copies of one prototype are near duplicates: same objects, so most share a caption
  first = [set(ex["captions"]) for ex, c in zip(train, scene, strict=True) if c == scene[copies][0]]
  assert len(first) >= 5 and np.mean([bool(first[0] & s) for s in first[1:]]) > 0.5
  test = [ex["scene_id"] for _, ex in b._generate_examples("test", cfg.num_test, 2)]
  assert min(test) >= cfg.num_prototypes and len(set(test)) == cfg.num_test
