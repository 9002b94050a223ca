"""The shapes_fewshot TFDS builder: disjoint class splits over 96 (colour, texture, shape)
classes with every attribute seen in training, labels consistent with their names, the stored
splits exactly the pure rendering functions' output, and the shifted configs' all-class
splits."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from bigvl.data import sources
from bigvl.data.builders import shapes_captions as sc
from bigvl.data.builders import shapes_fewshot as fs


def _split(root, name, split):
  src, info = sources.get_source(f"shapes_fewshot/{name}", split, root)
  return [src[i] for i in range(len(src))], info


def test_classes_and_class_splits():
  assert len(fs.CLASS_NAMES) == 96 == len(set(fs.CLASS_NAMES))
  assert fs.CLASS_NAMES[fs.class_id("red", "striped", "circle")] == "red striped circle"
  assert fs.OBJECT_NAMES == sc.CLASS_NAMES and tuple(fs.COLORS) == tuple(sc.COLORS)
  assert fs.SHAPES == sc.SHAPES
  for label, name in enumerate(fs.CLASS_NAMES):
    colour, texture, shape = fs.class_attributes(label)
    assert name == f"{colour} {texture} {shape}" and fs.class_id(colour, texture, shape) == label
    assert fs.OBJECT_NAMES[fs.object_label(label)] == f"{colour} {shape}"
  splits = (fs.TRAIN_CLASSES, fs.VAL_CLASSES, fs.TEST_CLASSES)
  assert tuple(map(len, splits)) == (60, 16, 20)
  assert sorted(c for s in splits for c in s) == list(range(96))  # disjoint, covering
  assert all(list(s) == sorted(s) for s in splits)
  train = [fs.class_attributes(c) for c in fs.TRAIN_CLASSES]
  assert {a[0] for a in train} == set(fs.COLORS)
  assert {a[1] for a in train} == set(fs.TEXTURES)
  assert {a[2] for a in train} == set(fs.SHAPES)


def test_render_is_pure_and_images_differ():
  spec = fs.sample_object(7, np.random.default_rng(3))
  assert spec == fs.sample_object(7, np.random.default_rng(3))
  a, b = fs.render(spec, 32), fs.render(spec, 32)
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(fs.make_example(7, 0, "test")["image"],
                                fs.make_example(7, 0, "test")["image"])
  images = [fs.make_example(7, k, split)["image"] for split in ("train", "test") for k in range(3)]
  assert len({im.tobytes() for im in images}) == len(images)
  # the object is what the image is about: more saturated than the background around it
  spec["noise_sigma"] = 0.0
  obj = spec["scene"]["objects"][0]
  obj.update(x=0.5, y=0.5, r=0.3, shape="square")
  image = fs.render(spec, 32).astype(float)
  sat = lambda px: (px.max(-1) - px.min(-1)) / np.maximum(px.max(-1), 1)
  assert sat(image[14:18, 14:18]).mean() > sat(image[:3, :3]).mean() + 0.2
  with pytest.raises(ValueError, match="odd"):
    fs.render(spec, 32, supersample=4)


def test_small_splits_hold_their_classes(fewshot_data_dir):
  counts = {"train": 16, "validation": 8, "test": 8}
  for split, per_class in counts.items():
    examples, info = _split(fewshot_data_dir, "small", split)
    assert info.features["label"].names == list(fs.CLASS_NAMES)
    assert info.features["object_label"].names == list(sc.CLASS_NAMES)
    assert info.features["texture"].names == list(fs.TEXTURES)
    labels = collections.Counter(int(ex["label"]) for ex in examples)
    assert labels == {c: per_class for c in fs.SPLIT_CLASSES[split]}, split
    for ex in examples:
      assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
      colour, texture, shape = fs.CLASS_NAMES[int(ex["label"])].split()
      assert sc.CLASS_NAMES[int(ex["object_label"])] == f"{colour} {shape}"
      assert fs.TEXTURES[int(ex["texture"])] == texture
      assert ex["class_name"].decode() == fs.CLASS_NAMES[int(ex["label"])]
    # the stored order is a fixed shuffle, not class by class
    assert len({int(ex["label"]) for ex in examples[:per_class]}) > 3
  # the stored test split is exactly the pure functions' output
  test, _ = _split(fewshot_data_dir, "small", "test")
  expected = sorted(fs.make_example(c, k, "test")["image"].tobytes()
                    for c in fs.TEST_CLASSES for k in range(8))
  assert sorted(ex["image"].tobytes() for ex in test) == expected


def test_shifted_splits_hold_every_class(fewshot_data_dir):
  src, info = sources.get_source("shapes_fewshot/shifted_small", "train", fewshot_data_dir)
  assert set(info.splits) == {"train", "test"}
  images = set()
  for split in ("train", "test"):
    examples, _ = _split(fewshot_data_dir, "shifted_small", split)
    assert collections.Counter(int(ex["label"]) for ex in examples) == \
        {c: 4 for c in range(96)}
    images |= {ex["image"].tobytes() for ex in examples}
  assert len(images) == 2 * 96 * 4  # different streams: no image repeats across splits
  small, _ = _split(fewshot_data_dir, "small", "train")  # seed 1: not default's images
  assert not images & {ex["image"].tobytes() for ex in small}
