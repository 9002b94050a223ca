"""Transform ops: masks move with the image, safe spec parsing, views, and the two-tower and
semi-supervised pipelines equal to the formulas they replaced."""

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer as HFTokenizer

from bigvl.config import ConfigError
from bigvl.data import augment, image_text, transforms
from bigvl.data.tokenizer import train_word_tokenizer


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _pixel_ids(h, w):
  """A label map whose label is the pixel's own flat index."""
  return np.arange(h * w, dtype=np.int32).reshape(h, w)


def _assert_aligned(image_out, mask_out, image_in, fill=None):
  """Every pixel of ``image_out`` is the input pixel its mask label names (or black where the
  mask is ``fill``)."""
  flat = image_in.reshape(-1, image_in.shape[-1])
  inside = mask_out != fill if fill is not None else np.ones(mask_out.shape, bool)
  np.testing.assert_array_equal(image_out[inside], flat[mask_out[inside]])
  assert (image_out[~inside] == 0).all()


@pytest.mark.parametrize("spec", ["random_flip(keys=('image', 'mask'))",
                                  "random_translate(0.25, keys=('image', 'mask'))",
                                  "weak(keys=('image', 'mask'))"])
def test_geometry_moves_image_and_mask_together(spec):
  image, mask = _image((16, 12, 3)), _pixel_ids(16, 12)
  t = transforms.build([spec])
  moved = 0
  for seed in range(12):
    out = t({"image": image, "mask": mask, "other": 5}, np.random.default_rng(seed))
    assert out["mask"].dtype == np.int32 and out["other"] == 5
    _assert_aligned(out["image"], out["mask"], image)
    moved += not np.array_equal(out["mask"], mask)
  assert moved >= 3  # the ops did move things


def test_strong_geometric_ops_warp_the_mask_with_fill():
  image, mask = _image((20, 20, 3), 1), _pixel_ids(20, 20)
  t = transforms.build(["strong(ops=('rotate', 'shear_x', 'shear_y', 'translate_y'), "
                        "cutout_max_fraction=0, keys=('image', 'seg'), masks='seg', "
                        "mask_fill=-1)"])
  filled = 0
  for seed in range(10):
    out = t({"image": image, "seg": mask}, np.random.default_rng(seed))
    _assert_aligned(out["image"], out["seg"], image, fill=-1)
    filled += int((out["seg"] == -1).sum())
  assert filled > 0


def test_masks_do_not_change_the_image_or_its_draws():
  image = _image((32, 32, 3), 2)
  with_mask = transforms.build(["strong(keys=('image', 'mask'))"])
  alone = transforms.build(["strong()"])
  for seed in range(20):
    a = with_mask({"image": image, "mask": _pixel_ids(32, 32)}, np.random.default_rng(seed))
    b = alone({"image": image}, np.random.default_rng(seed))
    np.testing.assert_array_equal(a["image"], b["image"])


def test_resize_image_bilinear_mask_nearest_and_aligned():
  ramp = np.arange(32, dtype=np.float64)
  # image value = 4 * (row, column): a linear function that bilinear resampling keeps.
  image = np.stack(np.broadcast_arrays(4 * ramp[:, None], 4 * ramp[None, :],
                                       np.zeros((32, 32))), -1).astype(np.uint8)
  mask = _pixel_ids(32, 32)
  for size in (64, 16):
    out = transforms.build([f"resize({size}, keys=('image', 'mask'))"])(
        {"image": image, "mask": mask})
    want = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out["image"], want)
    if size == 64:  # each input pixel becomes a 2x2 block of its label
      np.testing.assert_array_equal(out["mask"], np.repeat(np.repeat(mask, 2, 0), 2, 1))
    else:  # the input pixel under each output pixel's centre
      np.testing.assert_array_equal(out["mask"], mask[1::2, 1::2])
    # Aligned: away from the border the image value is its label pixel's, within a pixel.
    rows, cols = np.divmod(out["mask"], 32)
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(out["image"][..., 0][inner] - 4.0 * rows[inner]).max() <= 4
    assert np.abs(out["image"][..., 1][inner] - 4.0 * cols[inner]).max() <= 4


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (8, 8, 1)])
@pytest.mark.parametrize("flip", [True, False])
def test_weak_strong_ops_equal_augment(shape, flip):
  image = _image(shape, 3)
  weak = transforms.build([{"op": "weak", "flip": flip, "max_translate": 0.25}])
  strong = transforms.build([{"op": "strong", "flip": flip, "num_ops": 3,
                              "ops": ["rotate", "equalize", "posterize", "translate_x"]}])
  for seed in range(10):
    np.testing.assert_array_equal(
        weak({"image": image}, np.random.default_rng(seed))["image"],
        augment.weak_augment(image, np.random.default_rng(seed), flip=flip, max_translate=0.25))
    np.testing.assert_array_equal(
        strong({"image": image}, np.random.default_rng(seed))["image"],
        augment.strong_augment(image, np.random.default_rng(seed), flip=flip, num_ops=3,
                               ops=("rotate", "equalize", "posterize", "translate_x")))


def test_views_stack_and_consume_the_generator_in_order():
  image = _image((32, 32, 3), 4)
  t = transforms.build(["views(['weak()'], ['strong()'], ['strong()'], out='image')"])
  out = t({"image": image, "label": 3}, np.random.default_rng(9))
  assert out["image"].shape == (3, 32, 32, 3) and out["label"] == 3
  assert not np.array_equal(out["image"][1], out["image"][2])
  rng = np.random.default_rng(9)  # the same draws, view after view
  want = [augment.weak_augment(image, rng), augment.strong_augment(image, rng),
          augment.strong_augment(image, rng)]
  np.testing.assert_array_equal(out["image"], np.stack(want))


def test_semisup_recipes_equal_the_old_transforms():
  """The labeled / unlabeled transforms of semisup as ops vs their old formulas."""
  flip, mt, ops = False, 0.125, ("rotate", "contrast", "solarize")
  weak = {"op": "weak", "flip": flip, "max_translate": mt}
  strong = {"op": "strong", "flip": flip, "max_translate": mt, "num_ops": 2, "ops": list(ops)}
  labeled = transforms.build([weak, {"op": "cast", "key": "label"}, "keep(('image', 'label'))"])
  unlabeled = transforms.build([
      {"op": "views", "args": [[weak], [strong]], "out": "image"}, "cast('index')",
      "cast('label', default=-1)", "keep(('image', 'index', 'label'))"])
  for i in range(6):
    ex = {"image": _image((28, 28, 1), i), "index": np.int64(i), "label": np.int64(i % 3)}
    if i % 2:
      del ex["label"]
    else:
      got = labeled(ex, np.random.default_rng(i))
      want = augment.weak_augment(ex["image"], np.random.default_rng(i), flip=flip,
                                  max_translate=mt)
      np.testing.assert_array_equal(got["image"], want)
      assert type(got["label"]) is np.int32 and got["label"] == i % 3 and len(got) == 2
    got = unlabeled(ex, np.random.default_rng(i))
    rng = np.random.default_rng(i)
    want = np.stack([augment.weak_augment(ex["image"], rng, flip=flip, max_translate=mt),
                     augment.strong_augment(ex["image"], rng, flip=flip, max_translate=mt,
                                            ops=ops)])
    np.testing.assert_array_equal(got["image"], want)
    assert list(got) == ["image", "index", "label"] and type(got["index"]) is np.int32
    assert got["label"] == (-1 if i % 2 else i % 3) and type(got["label"]) is np.int32


# --- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,message", [
    ("resize(__import__('os'))", "not a literal"),
    ("resize(size=open('/tmp/bigvl_spec_probe', 'w'))", "not a literal"),
    ("os.system('true')", "plain op name"),
    ("resize(32)[0]", "plain op name"),
    ("resize(*[32])", r"\*args"),
    ("resize(**{'size': 32})", r"\*\*kwargs"),
    ("resize(32", "never closed"),
    ("no_such_op(1)", "unknown transform op 'no_such_op'"),
    ("resize()", "missing a required argument: 'size'"),
    ("resize(32, colour=1)", "unexpected keyword argument 'colour'"),
    ("resize(-3)", "positive int"),
    ({"size": 32}, "needs 'op'"),
    ({"op": "resize", "args": 32}, "must be a list"),
    (7, "got int"),
    ("tokenize(8)", "needs a tokenizer"),
    ("views(['weak()'], ['nope()'])", r"\[1\]\.views\[1\]\[0\]='nope\(\)': unknown"),
    ("strong(keys=('a', 'b'))", "exactly one image"),
])
def test_bad_specs_are_config_errors(spec, message):
  with pytest.raises(ConfigError, match=message) as e:
    transforms.build(["keep('image')", spec], where="config.input.transforms")
  assert str(e.value).startswith("config.input.transforms[1]") and "\n" not in str(e.value)


def test_spec_parser_evaluates_nothing(tmp_path):
  probe = tmp_path / "probe"
  with pytest.raises(ConfigError):
    transforms.build([f"resize(open({str(probe)!r}, 'w'))"])
  assert not probe.exists()


def test_string_and_dict_specs_build_the_same_op():
  image = _image((24, 24, 3), 5)
  a = transforms.build(["random_translate(0.25, keys=['image'])", "resize((12, 16))"])
  b = transforms.build([{"op": "random_translate", "args": [0.25], "keys": ("image",)},
                        {"op": "resize", "size": [12, 16]}])
  for seed in range(5):
    x, y = (t({"image": image}, np.random.default_rng(seed))["image"] for t in (a, b))
    assert x.shape == (12, 16, 3)
    np.testing.assert_array_equal(x, y)


def test_key_ops():
  ex = {"a": 1, "b": np.int64(2), "c": [3]}
  t = transforms.build(["copy({'a': 'a2'})", "rename({'b': 'bee'})", "cast('bee', 'int32')",
                        "cast('z', default=-1)", "cast('y', required=False)", "drop('c')",
                        "keep(('bee', 'a2'), optional=('z', 'y'))"])
  out = t(ex)
  assert list(out) == ["bee", "a2", "z"] and out["a2"] == 1 and out["z"] == -1
  assert type(out["bee"]) is np.int32 and ex == {"a": 1, "b": 2, "c": [3]}
  with pytest.raises(KeyError, match="no key"):
    transforms.build(["keep('missing')"])(ex)


def test_eval_transform_refuses_randomness():
  with pytest.raises(RuntimeError, match="deterministic"):
    transforms.build(["random_flip"])({"image": _image((4, 4, 3))})


def test_sample_captions():
  ex = {"captions": [b"zero", "one", "two"]}
  t = transforms.build(["sample_captions(3, out='texts')"])
  for seed in range(5):  # enough captions: distinct
    assert sorted(t(ex, np.random.default_rng(seed))["texts"]) == ["one", "two", "zero"]
  few = transforms.build(["sample_captions(5)"])({"captions": {"text": ["x"]}},
                                                 np.random.default_rng(0))
  assert few["captions"] == ["x"] * 5
  first = transforms.build(["sample_captions(4, random=False)"])(ex)
  assert first["captions"] == ["zero", "one", "two", "zero"]


# --- the two-tower pipeline ------------------------------------------------------------------


def _old_two_tower(example, rng, hf, k, max_len, size, image_key, text_key, eos=2):
  """The transform two_tower used before the ops, from its formulas: K captions drawn with
  ``rng.choice``, PIL bilinear resize, ``x * 2/255 - 1``, ``ids[:L-1] + [EOS]`` padded 0."""
  texts = example[text_key]
  texts = texts["text"] if isinstance(texts, dict) else texts
  texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
  picks = rng.choice(len(texts), size=k, replace=len(texts) < k)
  tokens = np.zeros((k, max_len), np.int32)
  for row, i in enumerate(picks):
    ids = hf.encode(texts[i]).ids[:max_len - 1] + [eos]
    tokens[row, :len(ids)] = ids
  image = example[image_key]
  if size is not None and image.shape[0] != size:
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  return {"image": image.astype(np.float32) * (2.0 / 255.0) - 1.0, "tokens": tokens}


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
  corpus = ["a red circle", "a blue square left of a green triangle", "two small shapes"] * 4
  path = tmp_path_factory.mktemp("tok") / "word.json"
  return train_word_tokenizer(corpus, str(path), 64), HFTokenizer.from_file(str(path))


@pytest.mark.parametrize("k,max_len,size,image_key,text_key", [
    (1, 16, None, "image", "captions"), (3, 4, 16, "image", "captions"),
    (5, 6, 24, "img", "alt")])
def test_two_tower_train_transform_equals_old(word_tokenizer, k, max_len, size, image_key,
                                              text_key):
  tok, hf = word_tokenizer
  t = image_text.ImageTextTransform(tok, max_len, captions_per_image=k, image_size=size,
                                    image_key=image_key, text_key=text_key)
  rng = np.random.default_rng(0)
  for i in range(12):
    caps = ["a red circle left of a blue square", "two small shapes", "a green triangle"]
    caps = caps[:1 + i % 3]
    ex = {image_key: _image((16 + 8 * (i % 2), 16 + 8 * (i % 2), 3), i),
          text_key: [c.encode() for c in caps] if i % 2 else {"text": caps}}
    seed = int(rng.integers(1 << 30))
    got = t(ex, np.random.default_rng(seed))
    want = _old_two_tower(ex, np.random.default_rng(seed), hf, k, max_len, size, image_key,
                          text_key)
    assert list(got) == ["image", "tokens"]
    for key in want:
      assert got[key].dtype == want[key].dtype
      np.testing.assert_array_equal(got[key], want[key])


def test_two_tower_eval_and_config_override(word_tokenizer):
  tok, hf = word_tokenizer
  t = image_text.ImageTextTransform(tok, 8, image_size=16)
  ex = {"image": _image((16, 16, 3)), "captions": ["a red circle", "two small shapes"],
        "label": np.int64(4)}
  out = t.eval(ex, 3)
  assert list(out) == ["image", "tokens", "label"] and type(out["label"]) is np.int32
  want = [hf.encode(c).ids + [2] for c in ("a red circle", "two small shapes", "a red circle")]
  np.testing.assert_array_equal(out["tokens"], [w + [0] * (8 - len(w)) for w in want])
  assert "label" not in t.eval({k: v for k, v in ex.items() if k != "label"}, 1)
  custom = image_text.ImageTextTransform(
      tok, 8, train_specs=["sample_captions(2)", "tokenize(8, bos=False, eos=False)",
                           "value_range(0, 1)", "keep(('image', 'tokens'))"])
  out = custom(ex, np.random.default_rng(0))
  assert out["tokens"].shape == (2, 8) and 2 not in out["tokens"]
  np.testing.assert_allclose(out["image"], ex["image"] / np.float32(255), rtol=1e-6)
  with pytest.raises(ConfigError, match=r"config.input.transforms\[0\]"):
    image_text.ImageTextTransform(tok, 8, train_specs=["tokenize(8, bos=True)"])


def test_random_scale_crop_keeps_image_and_mask_aligned_and_pads_with_ignore():
  """Blocks of one label, the image's value 10 x label: after any scale and crop, every pixel
  away from a block edge has image == 10 x mask; padding is mask_fill in the mask, fill in the
  image; the output is crop x crop; the scale range is respected."""
  labels = np.repeat(np.repeat(np.arange(12).reshape(3, 4), 8, 0), 8, 1).astype(np.uint8)
  image = np.repeat((labels * 10)[..., None], 3, axis=-1).astype(np.uint8)  # 24 x 32
  t = transforms.build(["random_scale_crop(40, base_size=32, scale=(0.5, 2.0), "
                        "keys=('image', 'mask'))"])
  padded = 0
  for seed in range(20):
    out = t({"image": image, "mask": labels}, np.random.default_rng(seed))
    img, m = out["image"], out["mask"]
    assert img.shape == (40, 40, 3) and m.shape == (40, 40)
    pad = m == 255
    padded += pad.any()
    assert (img[pad] == 0).all()
    mm = np.pad(m.astype(int), 1, mode="edge")
    uniform = np.all([mm[1 + dy:41 + dy, 1 + dx:41 + dx] == m for dy in (-1, 0, 1)
                      for dx in (-1, 0, 1)], axis=0) & ~pad
    assert uniform.sum() > 100
    np.testing.assert_array_equal(img[uniform][:, 0], m[uniform].astype(int) * 10)
  assert padded >= 5  # small scales need padding to reach the crop
  with pytest.raises(ConfigError):
    transforms.build(["random_scale_crop(0, base_size=32)"])
