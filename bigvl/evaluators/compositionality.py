"""Compositionality: does the model prefer an image's caption to a hard negative of it?

ARO (Yuksekgonul et al., ICLR 2023) showed that contrastive image-text models often behave
like bags of words: a caption with its attributes or objects swapped scores as high as the
true one. SugarCrepe (Hsieh et al., NeurIPS 2023) measures this with fluent negatives of
several types. Per (image, true caption, negative) pair the prediction is correct when
``cos(image, true) > cos(image, negative)``; a tie counts as wrong, so a model blind to word
order (identical embeddings for a swapped caption) scores 0 on swaps, not 0.5.

Negatives (``bigvl.data.hard_negatives``):

* by default, made from the scene graph of the eval split's first ``num_examples`` images
  (``shapes_captions`` >= 1.2.0): ``swap_attribute``, ``swap_object``, ``replace_relation``,
  each false for the scene and in the dataset's grammar; the true caption is the scene's
  canonical caption. At most ``max_per_type`` negatives per type and image (scenes where a
  type is impossible lack it).
* with ``sugarcrepe_dir`` (a SugarCrepe json file or a directory of them) and ``image_root``:
  those pairs on their images (read with PIL when the evaluator runs, resized bilinearly to
  ``image_size``: by default the size of the task's eval split's images, which the task's
  eval transform takes). Types are the file names (``swap_att`` -> ``swap_attribute``, ...).

Uses only the declared task interface (``bigvl/tasks/base.py``), through
:class:`bigvl.evaluators._embedding.SplitEmbedder`: eval data ``'image_text'`` for the images,
``encode_texts`` + ``text_fn`` for the captions, ``image_fn`` for the images; so it evaluates a
two-tower task (SigLIP, CLIP) unchanged.

Metrics: ``accuracy_<type>`` and ``num_<type>`` (pairs) per type, ``accuracy`` (the mean over
the types that have pairs) and ``chance`` (0.5: a random scorer).

Config (``config.evals.<name>``): ``type='compositionality'``, ``every``, ``dataset``
(default: the task's), ``split`` (``'test'``), ``num_examples`` (512: the first N images; with
SugarCrepe, the first N records if given, else all), ``max_per_type`` (1; 0: every valid
negative), ``batch_size`` (global, 256), ``image_fn`` / ``text_fn`` (``'embed_images'`` /
``'embed_texts'``), ``sugarcrepe_dir``, ``image_root``, ``image_size`` (SugarCrepe only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from bigvl.config import ConfigError, Reader
from bigvl.data import hard_negatives
from bigvl.evaluators._embedding import SplitEmbedder
from bigvl.tasks.base import EvalView

CHANCE = 0.5


def pair_accuracy(zimg: np.ndarray, ztxt: np.ndarray, image: np.ndarray, true: np.ndarray,
                  negative: np.ndarray) -> np.ndarray:
  """[P] bool: ``cos(zimg[image], ztxt[true]) > cos(zimg[image], ztxt[negative])`` per pair
  (strictly: a tie is wrong). zimg: [N, E], ztxt: [T, E]; the index arrays are [P]."""
  def unit(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  zi, zt = unit(zimg)[image], unit(ztxt)
  return np.sum(zi * zt[true], -1) > np.sum(zi * zt[negative], -1)


def summarize(correct: np.ndarray, types: Sequence[str], order: Sequence[str] = ()
              ) -> dict[str, float]:
  """Per type ``accuracy_<type>`` (types without pairs have none) and ``num_<type>`` (every
  type of ``order`` is reported, then any other in sorted order), ``accuracy`` (their mean),
  ``chance``."""
  types = np.asarray(types, dtype=object)
  out: dict[str, float] = {}
  accs = []
  for t in list(order) + sorted(set(types.tolist()) - set(order)):
    sel = types == t
    out[f"num_{t}"] = float(np.sum(sel))
    if sel.any():
      out[f"accuracy_{t}"] = float(np.mean(correct[sel]))
      accs.append(out[f"accuracy_{t}"])
  out["accuracy"] = float(np.mean(accs)) if accs else 0.0
  out["chance"] = CHANCE
  return out


class _ImageFiles:
  """Images read with PIL on access, RGB, resized to ``size`` ([H, W]), as eval examples
  ``{'image', 'captions': [caption], 'caption'}``."""

  def __init__(self, paths: Sequence[str], captions: Sequence[str], size: tuple[int, int]):
    self.paths, self.captions, self.size = list(paths), list(captions), size

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict:
    from PIL import Image

    with Image.open(self.paths[i]) as im:
      im = im.convert("RGB")
      h, w = self.size
      if im.size != (w, h):
        im = im.resize((w, h), Image.Resampling.BILINEAR)
      image = np.asarray(im, dtype=np.uint8)
    return {"image": image, "captions": [self.captions[i]], "caption": self.captions[i]}


class Evaluator:
  """See the module docstring."""

  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.sugarcrepe_dir = cfg.typed("sugarcrepe_dir", str, None)
    image_root = cfg.typed("image_root", str, None)
    limit = cfg.typed("num_examples", int, None)
    if limit is not None and limit <= 0:
      raise ConfigError(f"{cfg.path}.num_examples must be > 0, got {limit}")
    max_per_type = cfg.typed("max_per_type", int, 1)
    if max_per_type < 0:
      raise ConfigError(f"{cfg.path}.max_per_type must be >= 0 (0: all), got {max_per_type}")
    self.max_per_type = max_per_type or None
    image_size = cfg.get("image_size", None)
    synthetic = self.sugarcrepe_dir is None
    self.embedder = SplitEmbedder(cfg, task, mesh,
                                  num_examples=(limit or 512) if synthetic else None)
    self._records: list[dict] | None = None
    if synthetic:
      if image_root is not None or image_size is not None:
        raise ConfigError(f"{cfg.path}: image_root / image_size are for sugarcrepe_dir only")
      features = getattr(self.embedder.info, "features", None)
      if features is not None and "objects" not in features:
        raise ConfigError(
            f"{cfg.path}: dataset {self.embedder.dataset!r} has no scene graph ('objects'; "
            f"shapes_captions >= 1.2.0 has) to make negatives from; its features: "
            f"{', '.join(features)}. Or give sugarcrepe_dir and image_root")
      return
    if image_root is None:
      raise ConfigError(f"{cfg.path}.sugarcrepe_dir needs image_root (the images' folder)")
    try:
      records = hard_negatives.load_sugarcrepe(self.sugarcrepe_dir, image_root)
    except (OSError, ValueError) as e:
      raise ConfigError(f"{cfg.path}.sugarcrepe_dir={self.sugarcrepe_dir!r}: {e}") from None
    self._records = records[:limit] if limit else records
    if not self._records:
      raise ConfigError(f"{cfg.path}.sugarcrepe_dir={self.sugarcrepe_dir!r} has no pairs")
    paths: dict[str, int] = {}
    for r in self._records:  # the distinct images, each embedded once
      r["image"] = paths.setdefault(r["image_path"], len(paths))
    if image_size is None:
      first = self.embedder.source[0]
      if first is None or "image" not in first:
        raise ConfigError(f"{cfg.path}: give image_size (the split's first image is unreadable)")
      image_size = np.asarray(first["image"]).shape[:2]
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
      raise ConfigError(f"{cfg.path}.image_size must be an int or (height, width), got "
                        f"{image_size!r}")
    self.image_size = (int(size[0]), int(size[1]))

  def records(self) -> list[dict]:
    """Per true caption: ``{'image': index into the evaluated images, 'caption', 'negatives':
    [(type, text)]}`` (synthetic: one per image, from its scene graph, read once; SugarCrepe:
    also ``image_path``)."""
    if self._records is not None:
      return self._records
    out, last = [], None
    source = self.embedder.source
    for i in range(len(source)):
      ex = source[i]
      if ex is not None:
        objs = hard_negatives.scene_objects(ex["objects"])
        last = {"caption": hard_negatives.true_caption(objs),
                "negatives": hard_negatives.hard_negatives(objs, self.max_per_type)}
      out.append({"image": i, **last})  # an unreadable record: its predecessor's, as embedded
    self._records = out
    return out

  def _image_source(self, records: list[dict]) -> Any:
    if self.sugarcrepe_dir is None:
      return None  # the split itself
    first: dict[int, dict] = {}
    for r in records:
      first.setdefault(r["image"], r)
    order = sorted(first)
    return _ImageFiles([first[i]["image_path"] for i in order],
                       [first[i]["caption"] for i in order], self.image_size)

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    records = self.records()
    zimg = self.embedder.embed(params, state, texts=False,
                               source=self._image_source(records))["zimg"]
    index: dict[str, int] = {}
    image, true, negative, types = [], [], [], []
    for r in records:
      t = index.setdefault(r["caption"], len(index))
      for kind, text in r["negatives"]:
        image.append(r["image"])
        true.append(t)
        negative.append(index.setdefault(text, len(index)))
        types.append(kind)
    order = hard_negatives.NEGATIVE_TYPES if self.sugarcrepe_dir is None else ()
    if not types:
      return summarize(np.zeros(0, bool), [], order)
    ztxt = self.embedder.embed_texts(params, state, list(index))
    correct = pair_accuracy(zimg, ztxt, np.asarray(image), np.asarray(true),
                            np.asarray(negative))
    return summarize(correct, types, order)
