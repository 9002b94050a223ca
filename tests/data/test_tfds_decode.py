"""bigvl.data.tfds_decode: the fast decoder returns TFDS's own numpy decoding -- values, types,
dtypes and key order -- for every record of every dataset bigvl builds and for edge cases
(grayscale images, empty and fixed-length sequences, vector tensors); features it cannot
decode keep TFDS's decoder; an unreadable record raises, so it is skipped and counted."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigvl.data import sources, tfds_decode


def same(a, b, where="example") -> None:
  """``a`` is ``b``: same types all the way down, equal arrays of equal dtype and shape."""
  assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
  if isinstance(a, dict):
    assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
    for k in a:
      same(a[k], b[k], f"{where}.{k}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
      same(x, y, f"{where}[{i}]")
  elif isinstance(a, np.ndarray):
    assert (a.dtype, a.shape) == (b.dtype, b.shape), where
    np.testing.assert_array_equal(a, b, err_msg=where)
  else:
    assert a == b and (not isinstance(a, np.generic) or a.dtype == b.dtype), where


def _tfds_and_fast(builder, split):
  ref = builder.as_data_source(split=split)
  raw = builder.as_data_source(split=split,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  decode = tfds_decode.fast_decoder(builder.info.features)
  assert decode is not None, builder.info.features
  return ref, tfds_decode.DecodedSource(raw, decode)


def _assert_split_equal(builder, split):
  ref, fast = _tfds_and_fast(builder, split)
  assert len(fast) == len(ref) > 0
  for i in range(len(ref)):
    same(fast[i], ref[i], f"{builder.info.full_name}:{split}[{i}]")


@pytest.fixture(scope="module")
def extra_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_decode"))


@pytest.mark.parametrize("name,fixture", [
    ("shapes_captions/small", "shapes_data_dir"),
    ("shapes_captions/cooc_small", "shapes_data_dir"),
    ("shapes_captions/equiv_small", "shapes_data_dir"),
    ("shapes_segmentation/small", "seg_data_dir"),
    ("shapes_fewshot/small", "fewshot_data_dir"),
])
def test_every_record_of_bigvls_datasets_decodes_as_tfds_does(name, fixture, request):
  builder = sources.tfds_builder(name, request.getfixturevalue(fixture))
  for split in builder.info.splits:
    _assert_split_equal(builder, split)
  src, _ = sources.get_source(name, "train", request.getfixturevalue(fixture))
  assert isinstance(src._source, tfds_decode.DecodedSource)  # the loaders use it


class DecodeEdgeCases(tfds.core.GeneratorBasedBuilder):
  """Features at the edges of the fast decoder's domain."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    f = tfds.features
    return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict({
        "gray": f.Image(shape=(5, 4, 1)),
        "rgb": f.Image(shape=(None, None, 3)),
        "vec": f.Tensor(shape=(2,), dtype=np.float32),
        "mat": f.Tensor(shape=(2, 3), dtype=np.int32),
        "f": np.float32, "i": np.int32, "b": np.bool_, "t": f.Text(),
        "labels": f.Sequence(f.ClassLabel(num_classes=3)),
        "fixed": f.Sequence(f.Text(), length=2),
        "points": f.Sequence(f.Tensor(shape=(2,), dtype=np.float32)),
        "objs": f.Sequence({"name": f.Text(), "w": np.float32, "k": np.int64}),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(12):
      n = i % 4  # 0 (empty) .. 3 elements
      yield i, {
          "gray": rng.integers(0, 256, (5, 4, 1), dtype=np.uint8),
          "rgb": rng.integers(0, 256, (3 + i % 2, 6, 3), dtype=np.uint8),
          "vec": rng.normal(size=2).astype(np.float32),
          "mat": rng.integers(-9, 9, (2, 3)).astype(np.int32),
          "f": np.float32(rng.normal()), "i": np.int32(-i), "b": bool(i % 2),
          "t": "ünï" * i,
          "labels": list(rng.integers(0, 3, n)),
          "fixed": [f"a{i}", f"b{i}"],
          "points": rng.normal(size=(n, 2)).astype(np.float32),
          "objs": {"name": [f"o{j}" for j in range(n)],
                   "w": rng.normal(size=n).astype(np.float32),
                   "k": np.arange(n, dtype=np.int64)},
      }


@pytest.fixture(scope="module")
def edge_builder(extra_dir):
  b = DecodeEdgeCases(data_dir=extra_dir, file_format="array_record")
  b.download_and_prepare(file_format="array_record")
  return b


def test_edge_cases_decode_as_tfds_does(edge_builder):
  _assert_split_equal(edge_builder, "train")


def test_what_the_fast_decoder_cannot_decode_keeps_tfds():
  f = tfds.features
  ragged = f.FeaturesDict({"x": f.Tensor(shape=(None, None), dtype=np.int64)})
  nested = f.FeaturesDict({"x": f.Sequence(f.Sequence(np.int64))})
  for features in (ragged, nested):
    assert tfds_decode.fast_decoder(features) is None
  assert tfds_decode.fast_decoder(f.FeaturesDict({"x": np.int64})) is not None


def test_an_unreadable_record_is_skipped_and_counted(edge_builder):
  ref, fast = _tfds_and_fast(edge_builder, "train")
  raw = [fast._records[0], b"\x0a\xff not a proto", fast._records[1]]
  src = sources.SkippingSource(tfds_decode.DecodedSource(raw, fast._decode), "broken")
  same(src[0], ref[0])
  assert src[1] is None and src.num_skipped == 1
  same(src[2], ref[1])
  with pytest.raises(KeyError, match="no feature"):  # a record without a feature
    fast._decode(b"")


def test_builders_png_round_trips_and_checks_the_declared_shape():
  import io

  from PIL import Image

  from bigvl.data.builders._png import png

  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
  gray = rng.integers(0, 256, (7, 5, 1), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png(rgb, (7, 5, 3))))), rgb)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png(gray, (None, 5, 1))))),
                                gray[..., 0])
  for bad, shape in ((rgb, (7, 5, 1)), (rgb.astype(np.int32), (7, 5, 3)), (rgb[..., 0], (7, 5))):
    with pytest.raises(ValueError, match="uint8 image"):
      png(bad, shape)


def test_builders_encode_only_what_tfds_would_store_as_png():
  from bigvl.data.builders._png import encode_images

  f = tfds.features
  features = f.FeaturesDict({"a": f.Image(shape=(4, 4, 3)), "j": f.Image(shape=(4, 4, 3),
                             encoding_format="jpeg"), "n": np.int64})
  img = np.zeros((4, 4, 3), np.uint8)
  out = encode_images({"a": img, "j": img, "n": 3}, features)
  assert isinstance(out["a"], bytes) and out["a"].startswith(b"\x89PNG")
  assert out["j"] is img and out["n"] == 3  # jpeg and non-image features: TFDS's to encode
