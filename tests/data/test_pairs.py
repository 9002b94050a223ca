"""Segmentation list-file datasets (``pairs:<root>``): CCT's VOC-style lines, palette / grey /
RGB+palette.json masks read back exactly, a corrupt image skipped and counted, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bigvl.config import ConfigError
from bigvl.data import pairs, sources

VOC_COLORS = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)


def _palette_png(path, ids: np.ndarray) -> None:
  """A VOC-style palette ('P') PNG whose indices are ``ids``."""
  img = Image.frombytes("P", ids.shape[::-1], ids.astype(np.uint8).tobytes())
  img.putpalette(VOC_COLORS.ravel().tolist())
  img.save(path)


def _voc_tree(root):
  """JPEGImages/ (RGB png, grey png, RGBA png, corrupt jpg), SegmentationClass/ (palette
  PNGs with 255 boundaries, one grey 'L' PNG), train.txt, unlabeled.txt, classes.txt."""
  rng = np.random.default_rng(1)
  (root / "JPEGImages").mkdir(parents=True)
  (root / "SegmentationClass").mkdir()
  images = {"a.png": rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
            "b.png": rng.integers(0, 256, (6, 5), dtype=np.uint8),
            "c.png": rng.integers(0, 256, (4, 7, 4), dtype=np.uint8)}
  for name, array in images.items():
    Image.fromarray(array).save(root / "JPEGImages" / name)
  (root / "JPEGImages" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  masks = {"a.png": rng.integers(0, 3, (6, 5)), "b.png": rng.integers(0, 3, (6, 5)),
           "c.png": rng.integers(0, 3, (4, 7))}
  masks["a.png"][0, :] = 255  # VOC boundary / ignore
  masks["c.png"][:, 0] = 255
  _palette_png(root / "SegmentationClass" / "a.png", masks["a.png"])
  Image.fromarray(masks["b.png"].astype(np.uint8)).save(root / "SegmentationClass" / "b.png")
  _palette_png(root / "SegmentationClass" / "c.png", masks["c.png"])
  _palette_png(root / "SegmentationClass" / "broken.png", masks["a.png"])
  lines = ["/JPEGImages/a.png /SegmentationClass/a.png",
           "JPEGImages/b.png SegmentationClass/b.png", "",
           "/JPEGImages/broken.jpg /SegmentationClass/broken.png",
           "/JPEGImages/c.png /SegmentationClass/c.png  "]
  (root / "train.txt").write_text("\n".join(lines) + "\n")
  (root / "unlabeled.txt").write_text("/JPEGImages/c.png\n/JPEGImages/a.png\n")
  (root / "classes.txt").write_text("background\naeroplane\nbicycle\n")
  return images, masks


def test_voc_style_lists_read_back_exactly_and_skip_corrupt(tmp_path):
  images, masks = _voc_tree(tmp_path)
  src, info = sources.get_source(f"pairs:{tmp_path}", "train")
  assert len(src) == 4
  ex = [src[i] for i in range(len(src))]
  assert ex[2] is None and src.num_skipped == 1  # broken.jpg
  for e, name in zip((ex[0], ex[1], ex[3]), ("a.png", "b.png", "c.png"), strict=True):
    assert e["path"] == f"JPEGImages/{name}"
    assert e["image"].dtype == np.uint8 and e["image"].shape[2] == 3
    assert e["mask"].dtype == np.uint8 and e["mask"].shape == masks[name].shape + (1,)
    np.testing.assert_array_equal(e["mask"][..., 0], masks[name])  # palette indices, 255 kept
  np.testing.assert_array_equal(ex[0]["image"], images["a.png"])
  np.testing.assert_array_equal(ex[1]["image"], np.repeat(images["b.png"][..., None], 3, -1))
  np.testing.assert_array_equal(ex[3]["image"], images["c.png"][..., :3])  # alpha dropped
  assert info.features["mask"].names == ["background", "aeroplane", "bicycle"]
  assert info.features["mask"].num_classes == 3 and info.features["mask"].ignore_label == 255
  assert sorted(info.splits) == ["train", "unlabeled"]
  assert info.splits["train"].num_examples == 4

  unlabeled, _ = sources.get_source(f"pairs:{tmp_path}", "unlabeled")
  first = unlabeled[0]
  assert set(first) == {"image", "path"} and first["path"] == "JPEGImages/c.png"


def test_rgb_masks_map_through_palette_json(tmp_path):
  """ISPRS-style colour label images: colours -> ids by palette.json, unknown colours -> 255."""
  (tmp_path / "img").mkdir()
  (tmp_path / "lbl").mkdir()
  colors = {(255, 255, 255): 0, (0, 0, 255): 1, (0, 255, 255): 2, (255, 0, 0): 255}
  ids = np.array([[0, 1, 2], [2, 1, 0]])
  rgb = np.array(list(colors), np.uint8)[ids]
  rgb[1, 2] = (7, 7, 7)  # not in the palette
  Image.fromarray(rgb).save(tmp_path / "lbl" / "x.png")
  Image.fromarray(np.zeros((2, 3), np.uint8)).save(tmp_path / "img" / "x.png")  # grey image
  (tmp_path / "palette.json").write_text(json.dumps({",".join(map(str, c)): v
                                                     for c, v in colors.items()}))
  (tmp_path / "val.txt").write_text("img/x.png lbl/x.png\n")
  src, info = sources.get_source(f"pairs:{tmp_path}", "val")
  ex = src[0]
  assert ex["image"].shape == (2, 3, 3)
  np.testing.assert_array_equal(ex["mask"][..., 0], [[0, 1, 2], [2, 1, 255]])
  assert info.features["mask"].names is None and info.features["mask"].num_classes == 3

  (tmp_path / "palette.json").unlink()  # an RGB mask without a palette cannot be read
  src, info = sources.get_source(f"pairs:{tmp_path}", "val")
  assert src[0] is None and src.num_skipped == 1
  assert info.features["mask"].num_classes is None
  with pytest.raises(ValueError, match="palette.json"):
    pairs.read_mask(str(tmp_path / "lbl" / "x.png"), None)


def test_errors_name_the_path_and_the_splits(tmp_path):
  _voc_tree(tmp_path)
  with pytest.raises(ConfigError, match=r"train_1464\.txt does not exist; splits under .*: "
                                        r"train, unlabeled$"):
    sources.get_source(f"pairs:{tmp_path}", "train_1464")
  with pytest.raises(ConfigError, match="does not exist"):
    sources.get_source(f"pairs:{tmp_path}", "classes")
  with pytest.raises(ConfigError, match="does not exist"):
    sources.get_source(f"pairs:{tmp_path}/nowhere", "train")
  (tmp_path / "bad.txt").write_text("a.png b.png c.png\n")
  with pytest.raises(ConfigError, match=r"bad\.txt:1: expected"):
    sources.get_source(f"pairs:{tmp_path}", "bad")
  (tmp_path / "palette.json").write_text('{"1,2": 3}')
  with pytest.raises(ConfigError, match="palette.json must map"):
    sources.get_source(f"pairs:{tmp_path}", "train")
  # a mask whose size differs from its image's is a bad record, skipped
  _palette_png(tmp_path / "SegmentationClass" / "a.png", np.zeros((2, 2)))
  (tmp_path / "palette.json").unlink()
  src, _ = sources.get_source(f"pairs:{tmp_path}", "train")
  assert src[0] is None and src.num_skipped == 1
