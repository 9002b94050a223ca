"""Image-text examples: the two-tower train / eval pipelines as transform ops
(``bigvl.data.transforms``), plus the tokenizer a dataset uses.

Input example: ``{image_key: uint8 [H, W, 3], text_key: [str | bytes, ...] or {'text': [...]}}``.
Output: ``{'image': float32 [H, W, 3] in [-1, 1], 'tokens': int32 [K, L]}`` (train; K =
``captions_per_image``, drawn at random) or ``{'image', 'tokens': [C, L] the first C captions
cycling, 'label'?}`` (eval). The default train pipeline (:func:`default_train_specs`) is::

    sample_captions(K, key=text_key, out='texts')   # rng.choice(n, K, replace=n < K)
    copy({image_key: 'image'})                       # only if image_key != 'image'
    resize(image_size)                               # only if image_size; bilinear
    value_range(-1, 1)                               # x * 2/255 - 1
    tokenize(L, key='texts', out='tokens')           # ids[:L-1] + [EOS], padded
    keep(('image', 'tokens'))

``config.input.transforms`` replaces it with any list of op specs (it must still give
``image`` and ``tokens [K, L]``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from bigvl.data import transforms
from bigvl.data.tokenizer import Tokenizer, train_word_tokenizer

log = logging.getLogger(__name__)


def _image_specs(image_size: int | None, image_key: str) -> list[str]:
  specs = [] if image_key == "image" else [f"copy({{{image_key!r}: 'image'}})"]
  if image_size is not None:
    specs.append(f"resize({int(image_size)})")
  return specs + ["value_range(-1, 1)"]


def default_train_specs(*, captions_per_image: int = 1, max_len: int = 16,
                        image_size: int | None = None, image_key: str = "image",
                        text_key: str = "captions", group_key: str | None = None
                        ) -> list[str]:
  """The two-tower train pipeline as op specs (module docstring); with ``group_key`` the
  example's ground-truth equivalence group also goes into the batch as ``group`` (int32: what
  ``loss.mining`` scores its mined pairs against)."""
  group = [f"cast({group_key!r}, 'int32', out='group')"] if group_key else []
  keep = ("image", "tokens", "group") if group_key else ("image", "tokens")
  return ([f"sample_captions({captions_per_image}, key={text_key!r}, out='texts')"]
          + _image_specs(image_size, image_key)
          + [f"tokenize({max_len}, key='texts', out='tokens')", *group, f"keep({keep!r})"])


def eval_specs(num_captions: int, *, max_len: int = 16, image_size: int | None = None,
               image_key: str = "image", text_key: str = "captions",
               label_key: str | None = "label") -> list[str]:
  """The eval pipeline: the first ``num_captions`` captions (cycling), the image as in
  training, and ``label`` (int32) if ``label_key`` is set and the example has it."""
  specs = ([f"sample_captions({num_captions}, key={text_key!r}, out='texts', random=False)"]
           + _image_specs(image_size, image_key)
           + [f"tokenize({max_len}, key='texts', out='tokens')"])
  if label_key:
    specs.append(f"cast({label_key!r}, 'int32', out='label', required=False)")
  optional = ("label",) if label_key else ()
  return specs + [f"keep(('image', 'tokens'), optional={optional!r})"]


class ImageTextTransform:
  """The two-tower transforms: ``__call__(example, rng)`` runs the train pipeline (the default
  or ``train_specs``), ``eval(example, num_captions)`` the deterministic eval pipeline."""

  def __init__(self, tokenizer: Tokenizer, max_len: int, *, captions_per_image: int = 1,
               image_size: int | None = None, image_key: str = "image",
               text_key: str = "captions", label_key: str | None = "label",
               group_key: str | None = None,
               train_specs: Sequence[transforms.Spec] | None = None,
               where: str = "config.input.transforms"):
    self.tokenizer, self.max_len, self.k = tokenizer, max_len, captions_per_image
    self.image_size, self.image_key, self.text_key = image_size, image_key, text_key
    self.label_key = label_key
    if train_specs is None:
      train_specs = default_train_specs(
          captions_per_image=captions_per_image, max_len=max_len, image_size=image_size,
          image_key=image_key, text_key=text_key, group_key=group_key)
    self.train = transforms.build(train_specs, where=where, tokenizer=tokenizer)
    self._eval: dict[int, transforms.Transform] = {}
    self._image_label: dict[str, transforms.Transform] = {}

  def __call__(self, example: dict, rng: np.random.Generator) -> dict:
    return self.train(example, rng)

  def image_label(self, example: dict, label_key: str | None = None) -> dict:
    """``{'image' (as in training), 'label': int32}`` of an image-label example (no captions:
    a classification dataset for zero-shot features, ``bigvl.tools.extract_features``)."""
    key = label_key or self.label_key or "label"
    if key not in self._image_label:
      self._image_label[key] = transforms.build(
          _image_specs(self.image_size, self.image_key)
          + [f"cast({key!r}, 'int32', out='label')", "keep(('image', 'label'))"],
          where="eval transform")
    return self._image_label[key](example)

  def eval(self, example: dict, num_captions: int) -> dict:
    if num_captions not in self._eval:
      self._eval[num_captions] = transforms.build(
          eval_specs(num_captions, max_len=self.max_len, image_size=self.image_size,
                     image_key=self.image_key, text_key=self.text_key,
                     label_key=self.label_key),
          where="eval transform", tokenizer=self.tokenizer)
    return self._eval[num_captions](example)


def dataset_tokenizer(tokenizer_path: str | None, source: Any, text_key: str, root: str,
                      dataset: str, vocab_size: int = 4096) -> Tokenizer:
  """The configured tokenizer file (any ``tokenizer.json``; its BOS/EOS/pad as
  ``bigvl.data.tokenizer`` reads them), or one trained once on the train split's captions and
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
        yield from transforms.texts_of(ex[text_key])

  return train_word_tokenizer(texts(), path, vocab_size)
