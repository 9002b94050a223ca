"""Fast numpy decoding of TFDS records: TFDS's own result in less than half the time.

TFDS's numpy decoder (``builder.as_data_source(split)``, i.e.
``features.deserialize_example_np``) runs every example through generic machinery: every
flat tensor of the proto goes through a ragged-reshape helper, then the nested dict is
flattened, decoded leaf by leaf and re-nested. On ``shapes_captions`` (32x32 PNGs, 12
features) that is ~230 us of the ~270 us it takes to read a record, more than a tiny model's
whole transform: the largest part of its input pipeline's CPU time. Decoded here, a record
takes ~190 us with its read (``python -m bench.data_read``).

For a dataset whose features are *plain* -- each a leaf (a feature serialized as one tensor:
``Image``, ``Text``, ``ClassLabel``, ``Tensor``, ...) at the top level or inside one
``Sequence`` (of a leaf or of a dict of leaves), with at most one unknown dimension -- this
module reads the record's bytes (``deserialize_method=RAW_BYTES``), parses the
``tf.train.Example`` once and hands each leaf's values to that leaf's own TFDS
``decode_example_np`` (``decode_batch_example_np`` inside a sequence). The parsing repeats
TFDS's rules (the list kind checked int64 -> float -> bytes, ``np.array(values,
dtype)``, ``.item()`` for scalars, a reshape with ``-1`` for the unknown dimension), so the
decoded example is TFDS's, equal in values, types and dtypes (tests/data/test_tfds_decode.py
checks every example of every dataset bigvl builds, and edge cases). Any other dataset
(nested sequences, ragged tensors, multi-tensor features) keeps TFDS's decoder.

A record that does not parse, or lacks a feature, raises -- as TFDS's decoder does -- so
``sources.SkippingSource`` skips and counts it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

Decoder = Callable[[bytes], dict]


@dataclass(frozen=True)
class _Leaf:
  path: tuple[str, ...]   # where the value goes in the decoded example
  key: str                # the tf.train.Example feature key ("/"-joined path)
  feature: Any            # the TFDS leaf feature (decodes the parsed values)
  dtype: Any              # numpy dtype of the serialized values
  shape: tuple | None     # reshape target (-1 for the unknown dim); None: a scalar (.item())
  batched: bool           # inside a Sequence: decode_batch_example_np


def _leaf(path: tuple[str, ...], feature: Any, info: Any, batched: bool) -> _Leaf | None:
  """``info``: the serialized TensorInfo of the value (for a leaf in a Sequence, the
  Sequence's: its shape starts with the sequence length)."""
  from tensorflow_datasets.core import features as tfds_features

  if isinstance(info, dict) or isinstance(feature, (tfds_features.FeaturesDict,
                                                     tfds_features.Sequence)):
    return None  # a feature of several tensors, or a nested structure
  shape = tuple(info.shape)
  if info.sequence_rank != int(batched) or sum(d is None for d in shape) > 1:
    return None  # nested sequences, or ragged values (row lengths)
  target = tuple(-1 if d is None else d for d in shape) if shape else None
  return _Leaf(path, "/".join(path), feature, info.np_dtype, target, batched)


def plan(features: Any) -> list[_Leaf] | None:
  """The leaves of a plain ``FeaturesDict`` (sorted by path, the order of TFDS's decoded
  dicts), or None if it is not plain (see the module docstring)."""
  from tensorflow_datasets.core import features as tfds_features

  if not isinstance(features, tfds_features.FeaturesDict):
    return None
  leaves = []
  for name, feature in features.items():
    info = feature.get_serialized_info()
    if isinstance(feature, tfds_features.Sequence):
      inner = feature.feature
      if isinstance(inner, tfds_features.FeaturesDict):
        if not isinstance(info, dict) or set(info) != set(inner.keys()):
          return None
        items = [((name, sub), inner[sub], info[sub]) for sub in inner.keys()]
      else:
        items = [((name,), inner, info)]
      batched = True
    else:
      items, batched = [((name,), feature, info)], False
    for path, leaf_feature, leaf_info in items:
      leaf = _leaf(path, leaf_feature, leaf_info, batched)
      if leaf is None:
        return None
      leaves.append(leaf)
  return sorted(leaves, key=lambda leaf: leaf.path)  # TFDS's examples have sorted keys


def _values(feature_map: Any, leaf: _Leaf) -> Any:
  if leaf.key not in feature_map:  # (indexing a protobuf map would insert the key)
    raise KeyError(f"malformed record: no feature {leaf.key!r}")
  f = feature_map[leaf.key]
  for kind in ("int64_list", "float_list", "bytes_list"):
    if f.HasField(kind):
      values = np.array(getattr(f, kind).value, dtype=leaf.dtype)
      return values.item() if leaf.shape is None else values.reshape(leaf.shape)
  raise AttributeError(f"malformed record: feature {leaf.key!r} holds no list")


def fast_decoder(features: Any) -> Decoder | None:
  """``decode(record_bytes) -> example`` equal to TFDS's numpy decoding of ``features``, or
  None when the features are not plain (then use TFDS's decoder)."""
  leaves = plan(features)
  if leaves is None:
    return None
  from tensorflow_datasets.proto import tf_example_pb2

  parse = tf_example_pb2.Example.FromString

  def decode(record: bytes) -> dict:
    feature_map = parse(record).features.feature
    out: dict = {}
    for leaf in leaves:
      values = _values(feature_map, leaf)
      value = (leaf.feature.decode_batch_example_np(values) if leaf.batched
               else leaf.feature.decode_example_np(values))
      if len(leaf.path) == 1:
        out[leaf.path[0]] = value
      else:
        out.setdefault(leaf.path[0], {})[leaf.path[1]] = value
    return out

  return decode


class DecodedSource:
  """A random-access source of raw records, decoded by ``decode`` on read."""

  def __init__(self, records: Any, decode: Decoder):
    self._records, self._decode = records, decode

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    return self._decode(self._records[index])

  def __repr__(self) -> str:
    return f"DecodedSource({self._records!r})"
