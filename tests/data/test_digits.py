"""Embedded digit sources: sizes, splits, determinism, class-balanced labeled subsets."""

import hashlib

import grain
import numpy as np
import pytest

from bigvl.data import digits
from bigvl.data.labels import labeled_indices
from bigvl.data.streams import IndexedSubset


@pytest.mark.parametrize("name,n_train,n_test,shape", [("mnist5k", 4000, 1000, (28, 28, 1)),
                                                       ("digits8x8", 1497, 300, (8, 8, 1))])
def test_sizes_and_items(name, n_train, n_test, shape):
  train, test = digits.load_split(name, "train"), digits.load_split(name, "test")
  assert len(train) == n_train and len(test) == n_test
  assert len(digits.load_split(name, "all")) == n_train + n_test
  item = train[5]
  assert set(item) == {"image", "label", "index"}
  assert item["image"].shape == shape and item["image"].dtype == np.uint8
  assert isinstance(item["label"], int) and 0 <= item["label"] < 10 and item["index"] == 5
  assert train.images.max() == 255 and train.images.min() == 0
  # Stratified test split: equal count per class.
  np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), n_test // 10)


@pytest.mark.parametrize("name", digits.NAMES)
def test_train_test_disjoint_and_cover(name):
  tr, te = digits.split_indices(name, "train"), digits.split_indices(name, "test")
  assert len(np.intersect1d(tr, te)) == 0
  np.testing.assert_array_equal(np.union1d(tr, te), digits.split_indices(name, "all"))
  all_ = digits.load_split(name, "all")
  np.testing.assert_array_equal(digits.load_split(name, "test").images, all_.images[te])


def _hashes(images):
  return [hashlib.sha256(im.tobytes()).hexdigest() for im in images]


@pytest.mark.parametrize("name", digits.NAMES)
def test_no_test_image_is_also_a_train_image(name):
  """Disjoint by content, not only by index: no test image (pixel for pixel) occurs in the
  train split, and neither split holds an image twice."""
  train, test = (_hashes(digits.load_split(name, s).images) for s in ("train", "test"))
  assert not set(train) & set(test)
  assert len(set(train)) == len(train) and len(set(test)) == len(test)
  # The hash sees every pixel: a copy of a train image planted in the test split is found.
  planted = digits.load_split(name, "test").images.copy()
  planted[7] = digits.load_split(name, "train").images[123]
  assert set(_hashes(planted)) & set(train) == {train[123]}


def test_deterministic():
  a = digits.load_split("digits8x8", "test")
  b = digits.load_split("digits8x8", "test")
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  # Pinned: the fixed split does not drift between versions.
  te = digits.split_indices("mnist5k", "test")
  assert te[:5].tolist() == [2, 5, 15, 18, 19] and int(te.sum()) == 2499608
  te = digits.split_indices("digits8x8", "test")
  assert te[:5].tolist() == [5, 12, 14, 16, 17] and int(te.sum()) == 271980


def test_digits_rescaled():
  from sklearn.datasets import load_digits
  raw = load_digits().data.reshape(-1, 8, 8)
  imgs = digits.load_split("digits8x8", "all").images[..., 0]
  np.testing.assert_array_equal(imgs, np.rint(raw * 255 / 16).astype(np.uint8))


def test_labeled_indices_balanced_and_seeded():
  labels = digits.load_split("mnist5k", "train").labels
  idx = labeled_indices(labels, 40, seed=1)
  assert len(idx) == 40 and len(np.unique(idx)) == 40 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=10), 4)
  np.testing.assert_array_equal(idx, labeled_indices(labels, 40, seed=1))
  assert not np.array_equal(idx, labeled_indices(labels, 40, seed=2))
  assert set(idx) <= set(labeled_indices(labels, 250, seed=1))
  with pytest.raises(ValueError):
    labeled_indices(labels, 45, seed=0)
  with pytest.raises(ValueError):
    labeled_indices(np.array([0, 0, 1]), 4, seed=0)


def test_labeled_indices_small_example():
  labels = np.array([0, 1, 0, 1, 2, 2, 2])
  idx = labeled_indices(labels, 3, seed=0)
  np.testing.assert_array_equal(np.sort(labels[idx]), [0, 1, 2])


def test_subset_and_grain():
  train = digits.load_split("digits8x8", "train")
  idx = labeled_indices(train.labels, 20, seed=0)
  sub = IndexedSubset(train, idx)
  assert len(sub) == 20
  np.testing.assert_array_equal(np.stack([sub[i]["image"] for i in range(20)]),
                                train.images[idx])
  ds = grain.MapDataset.source(sub).map(lambda e: e["label"])
  assert [ds[i] for i in range(len(ds))] == list(train.labels[idx])
  batch = next(iter(grain.MapDataset.source(train).batch(4).to_iter_dataset()))
  assert batch["image"].shape == (4, 8, 8, 1) and batch["label"].shape == (4,)
