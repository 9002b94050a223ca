"""The LLaVA-style LVLM: image features land at the placeholders, text rows are plain LM rows,
cached decoding after an image prompt matches the full forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models.llm import LLM, LLMConfig
from bigvl.models.lvlm import LVLM
from bigvl.models.soft_prompt import SoftPromptSpec
from bigvl.models.vit import ViT

SIZE, VOCAB = 8, 64
IMG = VOCAB  # outside the vocab: mapped by safe_ids before the embedding lookup
LM = LLMConfig(vocab_size=VOCAB, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
               mlp_dim=64)
TOWER = ViT(patch_size=4, width=16, depth=3, num_heads=2, mlp_dim=32, pool="tok",
            activation="quick_gelu", norm_eps=1e-5, patch_bias=False, pre_norm=True)


def _model(**kw) -> LVLM:
  return LVLM(TOWER, LM, image_token_id=IMG, image_size=SIZE, **kw)


def _images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, SIZE, SIZE, 3)), jnp.float32)


def _ids(rows):
  return jnp.asarray(np.array(rows, np.int32))


N = _model().num_image_tokens  # (8 / 4)^2 patches, CLS dropped
PROMPT = [[1, 2] + [IMG] * N + [3, 4, 5], [7, 8, 9, 10, 11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def params():
  p = jax.jit(_model().init)(jax.random.key(0), _ids(PROMPT), _images(2))["params"]
  return nn.unbox(p)


def test_parameter_tree(params):
  assert set(params) == {"vision", "projector", "lm"}
  assert set(params["projector"]) == {"fc1", "fc2"}
  lm = nn.unbox(jax.eval_shape(LLM(LM).init, jax.random.key(0), _ids(PROMPT))["params"])
  assert jax.tree.structure(params["lm"]) == jax.tree.structure(lm)
  assert jax.tree.map(jnp.shape, params["lm"]) == jax.tree.map(jnp.shape, lm)
  assert "pre_ln" in params["vision"] and "bias" not in params["vision"]["embedding"]


def test_num_image_tokens():
  assert N == 4
  assert _model(feature_select="full").num_image_tokens == 5
  assert LVLM(TOWER.clone(pool="map"), LM, IMG, SIZE).num_image_tokens == 4


def test_image_features_are_the_projected_penultimate_layer(params):
  m, images = _model(), _images(2)
  got = m.apply({"params": params}, images, method=m.image_features)
  hidden = TOWER.apply({"params": params["vision"]}, images, feature_layer=-2)[:, 1:]
  pr = params["projector"]
  h = hidden @ pr["fc1"]["kernel"] + pr["fc1"]["bias"]
  want = jax.nn.gelu(h, approximate=False) @ pr["fc2"]["kernel"] + pr["fc2"]["bias"]
  assert got.shape == (2, N, LM.width)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # -2 is not the last block's output, and 'full' keeps the CLS token.
  last = TOWER.apply({"params": params["vision"]}, images, feature_layer=-1)
  assert np.abs(np.asarray(last - TOWER.apply({"params": params["vision"]}, images,
                                             feature_layer=-2))).max() > 1e-3
  full = _model(feature_select="full").apply({"params": params}, images,
                                             method=LVLM.image_features)
  assert full.shape == (2, N + 1, LM.width)
  np.testing.assert_allclose(full[:, 1:], got, rtol=1e-6, atol=1e-6)


def test_features_land_at_placeholders(params):
  m, images = _model(), _images(2)
  ids = _ids(PROMPT)
  got = np.asarray(m.apply({"params": params}, ids, images, method=m.embed))
  table = np.asarray(params["lm"]["embed"]["embedding"])
  feats = np.asarray(m.apply({"params": params}, images, method=m.image_features))
  want = table[np.where(np.asarray(ids) < VOCAB, np.asarray(ids), 0)]
  for b in range(2):
    pos = np.flatnonzero(np.asarray(ids[b]) == IMG)
    want[b, pos] = feats[b, : len(pos)]
  np.testing.assert_array_equal(got, want)
  assert (np.asarray(ids[0]) == IMG).sum() == N


def test_text_rows_are_plain_lm_rows(params):
  m = _model()
  ids = _ids(PROMPT)
  fwd = jax.jit(m.apply)
  logits = fwd({"params": params}, ids, _images(2))
  lm_only = jax.jit(LLM(LM).apply)({"params": params["lm"]}, ids[1:])
  np.testing.assert_allclose(logits[1:], lm_only, rtol=1e-5, atol=1e-5)
  # The image row: the image matters (two images give different logits), and positions before
  # the first placeholder are causal-only text.
  other = fwd({"params": params}, ids, _images(2, seed=5))
  assert np.abs(np.asarray(other[0, 2:] - logits[0, 2:])).max() > 1e-4
  np.testing.assert_allclose(other[0, :2], logits[0, :2], rtol=1e-6, atol=1e-6)
  # Text-only calls run no vision tower (no vision params needed at all).
  text = {k: v for k, v in params.items() if k != "vision"}
  np.testing.assert_allclose(jax.jit(m.apply)({"params": text}, ids[1:]), lm_only, rtol=1e-6,
                             atol=1e-6)


def test_two_images_a_row(params):
  m = _model()
  images = _images(2).reshape(1, 2, SIZE, SIZE, 3)
  ids = _ids([[1] + [IMG] * N + [2] + [IMG] * N + [3]])
  got = np.asarray(m.apply({"params": params}, ids, images, method=m.embed))
  feats = np.asarray(m.apply({"params": params}, images[0], method=m.image_features))
  np.testing.assert_array_equal(got[0, 1:1 + N], feats[0])
  np.testing.assert_array_equal(got[0, 2 + N:2 + 2 * N], feats[1])


def test_cached_decode_matches_full_forward(params):
  m = _model()
  images = _images(1)
  seq = _ids([[1, 2] + [IMG] * N + [3, 4, 5, 6, 7, 8]])
  prompt_len, total = 2 + N + 2, seq.shape[1]
  full = jax.jit(m.apply)({"params": params}, seq, images)
  cache = m.init_cache(1, total)
  assert cache["k"].shape == (LM.depth, 1, total, LM.num_kv_heads, LM.head_dim)
  step = jax.jit(lambda ids, c, i: m.apply({"params": params}, ids, cache=c, cache_index=i))
  logits, cache = jax.jit(lambda ids, im, c: m.apply({"params": params}, ids, im, cache=c))(
      seq[:, :prompt_len], images, cache)
  np.testing.assert_allclose(logits, full[:, :prompt_len], rtol=1e-5, atol=1e-5)
  for t in range(prompt_len, total):
    logits, cache = step(seq[:, t:t + 1], cache, t)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_soft_prompt_and_image_placeholders_in_one_row():
  """Soft-prompt vectors and image features both land at their own placeholders."""
  sp = VOCAB + 1
  m = LVLM(TOWER, LLMConfig(**{**LM.__dict__, "soft_prompts": (SoftPromptSpec(sp, 2),)}),
           image_token_id=IMG, image_size=SIZE)
  ids = _ids([[1, sp, sp] + [IMG] * N + [3]])
  p = nn.unbox(m.init(jax.random.key(1), ids, _images(1))["params"])
  emb = m.apply({"params": p}, ids, _images(1), method=m.embed)
  np.testing.assert_array_equal(emb[0, 1:3], p["lm"]["soft_prompts_0"]["prompt"])
  feats = m.apply({"params": p}, _images(1), method=m.image_features)
  np.testing.assert_allclose(emb[0, 3:3 + N], feats[0], atol=1e-6)
  np.testing.assert_array_equal(emb[0, -1], p["lm"]["embed"]["embedding"][3])
