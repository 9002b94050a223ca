"""The shapes_segmentation TFDS builder: masks true to the image and the image-level labels,
deterministic, every class present, and hard enough that colour clustering fails."""

from __future__ import annotations

import numpy as np
import pytest

from bigvl.data import sources
from bigvl.data.builders import shapes_segmentation as seg
from bigvl.evaluators import segmentation as evaluator


def _split(root, split):
  src, info = sources.get_source("shapes_segmentation/small", split, root)
  return [src[i] for i in range(len(src))], info


def kmeans_scores(images: np.ndarray, masks: np.ndarray, k: int = 5) -> dict[str, float]:
  """Scores of a ``k``-means clustering of the raw RGB pixels of ``images`` ``[N, H, W, 3]``,
  clusters matched one-to-one to the classes of ``masks`` ``[N, H, W]`` by the Hungarian
  algorithm over the whole set (the unsupervised-segmentation protocol)."""
  x, y = images.reshape(-1, 3), masks.reshape(-1).astype(np.int64)
  assign = evaluator.nearest_centre(x, evaluator.kmeans_centres(x, k, seed=0, iters=10))
  conf = evaluator.confusion_matrix(assign, y, k, len(seg.CLASS_NAMES), 255)
  return evaluator.scores(evaluator.remap_confusion(conf, evaluator.hungarian_assignment(conf)))


def test_examples_and_labels_match_the_masks(seg_data_dir):
  train, info = _split(seg_data_dir, "train")
  assert info.splits["train"].num_examples == 256 == len(train)
  assert info.splits["validation"].num_examples == 64
  assert info.splits["test"].num_examples == 64
  assert info.features["labels"].feature.names == list(seg.CLASS_NAMES[1:])
  present = np.zeros(len(seg.CLASS_NAMES), int)
  for ex in train:
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["mask"].shape == (32, 32, 1) and ex["mask"].dtype == np.uint8
    ids = np.unique(ex["mask"])
    assert ids.min() >= 0 and ids.max() < len(seg.CLASS_NAMES)
    assert list(ex["labels"]) == [int(v) - 1 for v in ids if v != 0]  # exactly, sorted
    assert int(ex["num_objects"]) == len(ex["labels"]) and 1 <= len(ex["labels"]) <= 3
    present[ids] += 1
  assert (present > 0).all(), present  # every class appears in the split
  test, _ = _split(seg_data_dir, "test")
  assert not np.array_equal(train[0]["image"], test[0]["image"])  # splits differ
  # the stored split is the pure functions' output from the split's stream (TFDS stores the
  # examples in a shuffled order)
  rng = np.random.default_rng([0, 2])
  rendered = [seg.render_scene(seg.sample_scene(rng), 32) for _ in range(len(test))]
  key = lambda image, mask: image.tobytes() + mask.tobytes()
  assert sorted(key(ex["image"], ex["mask"][..., 0]) for ex in test) == \
      sorted(key(*pair) for pair in rendered)


def test_render_is_deterministic_and_the_mask_is_the_pixel_centre():
  scene = seg.sample_scene(np.random.default_rng(3))
  assert scene == seg.sample_scene(np.random.default_rng(3))
  a, b = seg.render_scene(scene, 32), seg.render_scene(scene, 32)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  # one centred square, unrotated: the mask is the set of pixel centres inside it
  scene = {"background": {**scene["background"], "kind": "noise"},
           "objects": [{"shape": "square", "x": 0.5, "y": 0.5, "r": 0.2, "angle": 0.0,
                        "color": (0.0, 200.0, 0.0),
                        "texture": {"freq": 6.0, "angle": 0.0, "phase": 0.0, "amp": 0.0}}]}
  image, mask = seg.render_scene(scene, 20)
  half = 0.85 * 0.2 * 20  # the half side, in pixels: centres 10 +- 3.4 -> pixels 7..12
  centres = np.arange(20) + 0.5
  inside = np.abs(centres - 10) <= half
  np.testing.assert_array_equal(mask, np.outer(inside, inside) * seg.CLASS_NAMES.index("square"))
  assert tuple(image[10, 10]) == (0, 200, 0)
  with pytest.raises(ValueError, match="odd"):
    seg.render_scene(scene, 20, supersample=4)


def test_colour_clustering_is_clearly_imperfect(seg_data_dir):
  """The difficulty knob: k-means on RGB pixels cannot segment (distractor backgrounds)."""
  test, _ = _split(seg_data_dir, "test")
  images = np.stack([ex["image"] for ex in test])
  masks = np.stack([ex["mask"][..., 0] for ex in test])
  sc = kmeans_scores(images, masks)
  print(f"5-means on RGB pixels, small test split: pixel accuracy {sc['pixel_accuracy']:.3f}, "
        f"mIoU {sc['miou']:.3f}, all-background {np.mean(masks == 0):.3f}")
  assert sc["pixel_accuracy"] < 0.9


def test_textures_make_colour_useless_but_keep_the_classes(tmp_path):
  """``textures``: every region has its class's pattern in random colours: colour clustering
  falls to chance level (well below the default config's) while masks, labels and the class
  set are as in the default config."""
  root = str(tmp_path)
  src, info = sources.get_source("shapes_segmentation/textures_small", "test", root)
  test = [src[i] for i in range(len(src))]
  images = np.stack([ex["image"] for ex in test])
  masks = np.stack([ex["mask"][..., 0] for ex in test])
  assert info.features["labels"].feature.names == list(seg.CLASS_NAMES[1:])
  assert set(np.unique(masks)) == set(range(len(seg.CLASS_NAMES)))
  sc = kmeans_scores(images, masks)
  assert sc["miou"] < 0.15, sc  # ~1/K of the all-background mIoU's level
  # the per-class mean colours are alike: no class owns a hue
  means = np.stack([images[masks == c].mean(0) for c in range(len(seg.CLASS_NAMES))])
  assert np.ptp(means, axis=0).max() < 40, means
