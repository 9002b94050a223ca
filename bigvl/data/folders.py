"""Image-folder datasets: ``config.input.dataset = 'folder:<root>'``, one sub-directory per
class (Office-31's ``amazon/images/<class>/*.jpg``, Office-Home, VisDA-2017, USPS exported as
PNGs): how domain-adaptation benchmarks are distributed.

A split ``s`` reads ``<root>/<s>/<class>/*`` if ``<root>/<s>`` exists, else the whole of
``<root>/<class>/*`` (the domain-adaptation protocol trains on a domain's images without labels
and tests on the same images). Classes are the sorted sub-directory names of ``<root>`` (or of
the split directory); files with an image extension, sorted. A record is ``{'image': uint8
[H, W, 3] (RGB, decoded by PIL, any size), 'label': int, 'index': int}``; a file that does not
decode raises, and ``bigvl.data.sources.SkippingSource`` skips and counts it.
"""

from __future__ import annotations

import os

import numpy as np

from bigvl.config import ConfigError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm")


class FolderInfo:
  """The few ``DatasetInfo`` fields evaluators read: ``features['label'].names`` /
  ``num_classes``."""

  class _Label:
    def __init__(self, names: list[str]):
      self.names, self.num_classes = names, len(names)

  def __init__(self, names: list[str]):
    self.features = {"label": FolderInfo._Label(names)}


class ImageFolder:
  """Random-access source over ``<dir>/<class>/<file>`` (module docstring)."""

  def __init__(self, directory: str):
    if not os.path.isdir(directory):
      raise ConfigError(f"image folder {directory} does not exist")
    self.classes = sorted(d for d in os.listdir(directory)
                          if os.path.isdir(os.path.join(directory, d)))
    if not self.classes:
      raise ConfigError(f"image folder {directory} has no class sub-directories")
    self.files, labels = [], []
    for k, name in enumerate(self.classes):
      sub = os.path.join(directory, name)
      for f in sorted(os.listdir(sub)):
        if f.lower().endswith(EXTENSIONS):
          self.files.append(os.path.join(sub, f))
          labels.append(k)
    if not self.files:
      raise ConfigError(f"image folder {directory} holds no images ({', '.join(EXTENSIONS)})")
    self.labels = np.asarray(labels, np.int64)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict:
    from PIL import Image

    with Image.open(self.files[index]) as img:
      image = np.asarray(img.convert("RGB"), np.uint8)
    return {"image": image, "label": int(self.labels[index]), "index": int(index)}


def load(root: str, split: str) -> tuple[ImageFolder, FolderInfo]:
  """The source of ``split`` under ``root`` and its info (module docstring)."""
  root = os.path.expanduser(root)
  directory = os.path.join(root, split) if os.path.isdir(os.path.join(root, split)) else root
  src = ImageFolder(directory)
  return src, FolderInfo(src.classes)
