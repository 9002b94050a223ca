"""Image-folder datasets (``folder:<root>``) and the ``channels`` op: classes from the
directory names, a corrupt file skipped and counted, split directories when present."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bigvl.config import ConfigError
from bigvl.data import sources, transforms


def _write(root, cls, name, value, size=(5, 7)):
  d = root / cls
  d.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full(size + (3,), value, np.uint8)).save(d / name)


def test_folder_source_reads_classes_labels_and_skips_corrupt(tmp_path):
  _write(tmp_path, "cat", "a.png", 10)
  _write(tmp_path, "cat", "b.jpg", 20)
  _write(tmp_path, "dog", "c.png", 30, size=(9, 4))
  (tmp_path / "dog" / "broken.png").write_bytes(b"not an image")
  (tmp_path / "dog" / "notes.txt").write_text("ignored")
  src, info = sources.get_source(f"folder:{tmp_path}", "train")
  assert len(src) == 4 and info.features["label"].names == ["cat", "dog"]
  ex = [src[i] for i in range(len(src))]
  assert [e["label"] for e in ex if e is not None] == [0, 0, 1]
  assert ex[0]["image"].shape == (5, 7, 3) and ex[0]["image"].dtype == np.uint8
  assert int(ex[0]["image"][0, 0, 0]) == 10 and ex[3]["image"].shape == (9, 4, 3)
  assert ex[2] is None and src.num_skipped == 1  # broken.png sorts before c.png


def test_split_directories_and_errors(tmp_path):
  for split, value in (("train", 1), ("test", 2)):
    _write(tmp_path / split, "x", "a.png", value)
  src, _ = sources.get_source(f"folder:{tmp_path}", "test")
  assert int(src[0]["image"][0, 0, 0]) == 2
  with pytest.raises(ConfigError, match="does not exist"):
    sources.get_source(f"folder:{tmp_path}/nowhere", "train")
  (tmp_path / "empty" / "cls").mkdir(parents=True)
  with pytest.raises(ConfigError, match="no images"):
    sources.get_source(f"folder:{tmp_path}/empty", "train")


def test_channels_op():
  rgb = np.zeros((2, 2, 3), np.uint8)
  rgb[..., 0] = 100
  gray = transforms.build(["channels(1)"])({"image": rgb}, None)["image"]
  assert gray.shape == (2, 2, 1) and int(gray[0, 0, 0]) == round(0.299 * 100)
  back = transforms.build(["channels(3)"])({"image": gray}, None)["image"]
  assert back.shape == (2, 2, 3) and (back == gray).all()
  same = transforms.build(["channels(3)"])({"image": rgb}, None)["image"]
  assert same is not None and (same == rgb).all()
  with pytest.raises(ConfigError):
    transforms.build(["channels(2)"])
