"""Image-text examples: image normalisation, caption sampling (K captions per image for FFF)
and tokenisation, plus the tokenizer a dataset uses.

Input example: ``{image_key: uint8 [H, W, 3], text_key: [str | bytes, ...] or {'text': [...]}}``.
Output: ``{'image': float32 [H, W, 3] in [-1, 1], 'tokens': int32 [K, L]}`` (train; K =
``captions_per_image``) or ``{'image', 'tokens': [C, L] all captions, 'label'?}`` (eval).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from bigvl.data.tokenizer import Tokenizer, train_word_tokenizer

log = logging.getLogger(__name__)


def normalize_image(image: np.ndarray, size: int | None = None) -> np.ndarray:
  """uint8 [H, W, C] -> float32 in [-1, 1], resized (bilinear) to ``size`` if given."""
  image = np.asarray(image)
  if size is not None and image.shape[0] != size:
    from PIL import Image
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  return image.astype(np.float32) * (2.0 / 255.0) - 1.0


def texts_of(example: dict, key: str) -> list[str]:
  value = example[key]
  if isinstance(value, dict):  # e.g. coco_captions: {'id': ..., 'text': [...]}
    value = value["text"]
  if isinstance(value, (str, bytes)):
    value = [value]
  return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


class ImageTextTransform:
  """Per-example transform for grain; ``__call__(example, rng)`` for train, ``eval`` for eval."""

  def __init__(self, tokenizer: Tokenizer, max_len: int, *, captions_per_image: int = 1,
               image_size: int | None = None, image_key: str = "image",
               text_key: str = "captions", label_key: str | None = "label"):
    self.tokenizer, self.max_len, self.k = tokenizer, max_len, captions_per_image
    self.image_size, self.image_key, self.text_key = image_size, image_key, text_key
    self.label_key = label_key

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    texts = texts_of(example, self.text_key)
    replace = len(texts) < self.k
    picks = rng.choice(len(texts), size=self.k, replace=replace)
    return {"image": normalize_image(example[self.image_key], self.image_size),
            "tokens": self.tokenizer.encode([texts[i] for i in picks], self.max_len)}

  def eval(self, example: dict, num_captions: int) -> dict:
    texts = texts_of(example, self.text_key)
    texts = (texts * num_captions)[:num_captions]
    out = {"image": normalize_image(example[self.image_key], self.image_size),
           "tokens": self.tokenizer.encode(texts, self.max_len)}
    if self.label_key and self.label_key in example:
      out["label"] = np.int32(example[self.label_key])
    return out


def dataset_tokenizer(tokenizer_path: str | None, source: Any, text_key: str, root: str,
                      dataset: str, vocab_size: int = 4096) -> Tokenizer:
  """The configured tokenizer file, or one trained once on the train split's captions and
  saved next to the data (``<data_dir>/<dataset>/tokenizer_word<vocab>.json``)."""
  if tokenizer_path:
    return Tokenizer(os.path.expanduser(tokenizer_path))
  path = os.path.join(root, dataset.replace("/", "_"), f"tokenizer_word{vocab_size}.json")
  if os.path.exists(path):
    return Tokenizer(path)
  log.info("training a word tokenizer on the captions of %s -> %s", dataset, path)

  def texts():
    for i in range(len(source)):
      ex = source[i]
      if ex is not None:
        yield from texts_of(ex, text_key)

  return train_word_tokenizer(texts(), path, vocab_size)
