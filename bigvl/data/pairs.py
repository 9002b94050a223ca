"""Segmentation datasets given as list files: ``config.input.dataset = 'pairs:<root>'``, the
format the official CCT code (Ouali et al., CVPR 2020) uses for Pascal VOC and Cityscapes.

A split ``s`` reads ``<root>/<s>.txt``. Each non-empty line is ``image_path [mask_path]``
(whitespace-separated, so paths hold no spaces), both relative to ``<root>``; a leading ``/``
is stripped, so CCT's VOC lines read as they are (``/JPEGImages/2007_000032.jpg
/SegmentationClassAug/2007_000032.png`` with ``<root>`` = ``VOCdevkit/VOC2012``). A line with
only an image path is an unlabeled image (CCT's unlabeled lists). The splits of a root are its
``*.txt`` files other than ``classes.txt``.

A record is ``{'image': uint8 [H, W, 3], 'mask': uint8 [H, W, 1], 'path': str}``: the image
decoded by PIL and converted to RGB (grey, grey+alpha, palette and RGBA images too), ``mask``
only when the line has a mask path, ``path`` the image path as written in the list (without
the leading ``/``). Masks are PNG label images read by PIL:

* palette (``'P'``) images give their palette *indices* (VOC's ``SegmentationClass``: 0
  background, 1-20 the classes, 255 ignore: object boundaries and difficult regions);
* grey (``'L'``, ``'1'``, 16/32-bit ``'I'`` with values < 256) images give their values
  (``SegmentationClassAug``, Cityscapes' ``*_labelTrainIds.png``);
* RGB(A) label images (ISPRS Potsdam / Vaihingen, where a class is a colour) are mapped by
  ``<root>/palette.json``, ``{"255,255,255": 0, "0,0,255": 1, ...}`` (``"r,g,b"`` -> id); a
  colour that is not in it becomes 255 (ignore). Without ``palette.json`` an RGB mask raises.

255 is the ignore label (:data:`IGNORE`). Image and mask must have the same height and width.

Class names come from ``<root>/classes.txt`` (one per line, in id order) when it exists; the
info object's ``features['mask'].num_classes`` is their number, else the largest id in
``palette.json`` other than 255, plus one, else ``None`` (the task's config then says).

The list files, ``classes.txt`` and ``palette.json`` are read when the source is made (a
missing list is a ``ConfigError`` naming the path and the available splits); images and masks
are read on access, and one that is missing or does not decode raises there, so that
``bigvl.data.sources.SkippingSource`` skips and counts it. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os

import numpy as np

from bigvl.config import ConfigError

#: the ignore label of masks (VOC's boundaries, colours missing from ``palette.json``).
IGNORE = 255
CLASSES_FILE = "classes.txt"
PALETTE_FILE = "palette.json"
#: the mask modes read as ids directly (palette indices, grey values).
_ID_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N")


class PairsInfo:
  """The few ``DatasetInfo`` fields code reads: ``features['mask'].names`` /
  ``num_classes`` / ``ignore_label`` and ``splits[name].num_examples``."""

  class _Mask:
    def __init__(self, names: list[str] | None, num_classes: int | None):
      self.names, self.num_classes, self.ignore_label = names, num_classes, IGNORE

  class _Split:
    def __init__(self, path: str):
      self._path, self._num = path, None

    @property
    def num_examples(self) -> int:
      if self._num is None:
        self._num = len(read_list(self._path))
      return self._num

  def __init__(self, root: str, names: list[str] | None, num_classes: int | None):
    self.features = {"mask": PairsInfo._Mask(names, num_classes)}
    self.splits = {s: PairsInfo._Split(os.path.join(root, s + ".txt")) for s in splits(root)}


def splits(root: str) -> list[str]:
  """The split names under ``root``: its ``*.txt`` files but ``classes.txt``, sorted."""
  return sorted(f[:-len(".txt")] for f in os.listdir(root)
                if f.endswith(".txt") and f != CLASSES_FILE
                and os.path.isfile(os.path.join(root, f)))


def read_list(path: str) -> list[tuple[str, str | None]]:
  """The ``(image_path, mask_path | None)`` pairs of a list file, leading ``/`` stripped."""
  pairs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      fields = line.split()
      if not fields:
        continue
      if len(fields) > 2:
        raise ConfigError(f"{path}:{n}: expected 'image_path [mask_path]', got {line.strip()!r}")
      image, mask = (fields + [None])[:2]
      pairs.append((image.lstrip("/"), mask.lstrip("/") if mask else None))
  return pairs


def read_classes(root: str) -> list[str] | None:
  """The class names of ``<root>/classes.txt`` (non-empty lines), or None without one."""
  path = os.path.join(root, CLASSES_FILE)
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def read_palette(root: str) -> dict[tuple[int, int, int], int] | None:
  """``<root>/palette.json`` as ``{(r, g, b): id}``, or None without one."""
  path = os.path.join(root, PALETTE_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    palette = {}
    for key, value in raw.items():
      rgb = tuple(int(v) for v in key.split(","))
      if len(rgb) != 3 or not isinstance(value, int) or \
          not all(0 <= v <= 255 for v in (*rgb, value)):
        raise ValueError(f"{key!r}: {value!r}")
      palette[rgb] = value
  except (ValueError, AttributeError, TypeError) as e:
    raise ConfigError(f"{path} must map 'r,g,b' (0-255 each) to a class id 0-255: {e}"
                      ) from None
  return palette


def _rgb_code(rgb: np.ndarray) -> np.ndarray:
  """One int64 per colour of ``[..., 3]``: ``r << 16 | g << 8 | b``."""
  rgb = rgb.astype(np.int64)
  return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def map_colors(rgb: np.ndarray, palette: dict[tuple[int, int, int], int]) -> np.ndarray:
  """uint8 ``[H, W]`` ids of an RGB label image ``[H, W, 3]`` by ``palette``; other colours
  -> :data:`IGNORE`."""
  pixels = _rgb_code(rgb)
  if not palette:
    return np.full(pixels.shape, IGNORE, np.uint8)
  keys = _rgb_code(np.array(list(palette), np.int64))
  order = np.argsort(keys)
  keys, ids = keys[order], np.array(list(palette.values()), np.uint8)[order]
  at = np.minimum(np.searchsorted(keys, pixels), len(keys) - 1)
  return np.where(keys[at] == pixels, ids[at], IGNORE).astype(np.uint8)


def read_mask(path: str, palette: dict[tuple[int, int, int], int] | None) -> np.ndarray:
  """A label image as uint8 ``[H, W, 1]`` ids (module docstring)."""
  from PIL import Image

  with Image.open(path) as img:
    if img.mode in _ID_MODES:
      ids = np.asarray(img)
      if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"mask {path} has ids outside 0-255 ({ids.min()}-{ids.max()})")
      ids = ids.astype(np.uint8)
    elif img.mode in ("RGB", "RGBA"):
      if palette is None:
        raise ValueError(f"mask {path} is an RGB label image; mapping its colours to class ids "
                         f"needs {PALETTE_FILE} in the dataset root")
      ids = map_colors(np.asarray(img.convert("RGB")), palette)
    else:
      raise ValueError(f"mask {path} has unsupported mode {img.mode!r}")
  return ids[..., None]


class PairsSource:
  """Random-access source over the pairs of one list file (module docstring)."""

  def __init__(self, root: str, pairs: list[tuple[str, str | None]],
               palette: dict[tuple[int, int, int], int] | None):
    self.root, self.pairs, self.palette = root, pairs, palette

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    from PIL import Image

    image_path, mask_path = self.pairs[index]
    with Image.open(os.path.join(self.root, image_path)) as img:
      image = np.asarray(img.convert("RGB"), np.uint8)
    example = {"image": image, "path": image_path}
    if mask_path is not None:
      mask = read_mask(os.path.join(self.root, mask_path), self.palette)
      if mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"mask {mask_path} is {mask.shape[:2]}, image {image_path} is "
                         f"{image.shape[:2]}")
      example["mask"] = mask
    return example


def load(root: str, split: str) -> tuple[PairsSource, PairsInfo]:
  """The source of ``split`` (``<root>/<split>.txt``) and the root's info (module
  docstring)."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise ConfigError(f"pairs dataset root {root} does not exist")
  path = os.path.join(root, split + ".txt")
  if split == CLASSES_FILE[:-len(".txt")] or not os.path.isfile(path):
    raise ConfigError(f"split list {path} does not exist; splits under {root}: "
                      f"{', '.join(splits(root)) or 'none (no *.txt list files)'}")
  pairs = read_list(path)
  if not pairs:
    raise ConfigError(f"split list {path} has no lines")
  names, palette = read_classes(root), read_palette(root)
  if names:
    num_classes = len(names)
  elif palette and any(v != IGNORE for v in palette.values()):
    num_classes = max(v for v in palette.values() if v != IGNORE) + 1
  else:
    num_classes = None
  return PairsSource(root, pairs, palette), PairsInfo(root, names, num_classes)
