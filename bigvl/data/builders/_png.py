"""PNG encoding for the builders' images, with PIL.

Handing TFDS's ``Image`` feature an array makes it encode the PNG with a TensorFlow eager op
(~160 us for a 32x32 image, most of it op dispatch); PIL encodes the same pixels in a fraction
of that, and TFDS stores encoded bytes as given. PNG is lossless, so the decoded dataset is
the same array for array (the builders' tests compare stored splits with their pure render
functions; tests/data/test_tfds_decode.py round-trips); only the file bytes differ.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def png(image: np.ndarray, shape: tuple[int, ...]) -> bytes:
  """``image`` (uint8 ``[H, W, C]``, C in {1, 3}) as PNG bytes; ``shape`` is the feature's
  declared shape, checked as TFDS checks an array (it cannot check bytes)."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3) or any(
      d is not None and d != s for d, s in zip(shape, image.shape, strict=True)):
    raise ValueError(f"expected a uint8 image of shape {shape}, got {image.dtype} "
                     f"{image.shape}")
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="png")
  return buf.getvalue()


def encode_images(example: dict, features: Any) -> dict:
  """``example`` with each top-level array of a uint8 ``Image`` feature that TFDS would store
  as PNG (``encoding_format`` unset or 'png') PNG-encoded; others are left to TFDS."""
  from tensorflow_datasets.core.features import Image as ImageFeature

  out = dict(example)
  for name, feature in features.items():
    if (isinstance(feature, ImageFeature) and feature.np_dtype == np.uint8
        and feature.encoding_format in (None, "png") and isinstance(out.get(name), np.ndarray)):
      out[name] = png(out[name], feature.shape)
  return out


def png_splits(splits: dict, features: Any) -> dict:
  """A builder's ``_split_generators`` result with every example's images PNG-encoded by
  :func:`encode_images` (``_generate_examples`` itself keeps yielding arrays)."""
  return {split: ((key, encode_images(ex, features)) for key, ex in examples)
          for split, examples in splits.items()}
