"""The two-tower model: L2-normalised projections of the towers' pooled features, t and b."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models.text import TextTransformer
from bigvl.models.two_tower import TwoTower
from bigvl.models.vit import ViT
from tests.models import _np_reference as R

IMAGE = dict(patch_size=4, width=8, depth=1, num_heads=2, mlp_dim=16, pool="gap")
TEXT = dict(vocab_size=32, max_len=8, width=8, depth=1, num_heads=2, mlp_dim=16, pool="eos")


def _inputs():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
  tokens = np.array([[3, 5, 2, 0, 0, 0, 0, 0], [7, 2, 0, 0, 0, 0, 0, 0],
                     [4, 9, 9, 6, 1, 2, 0, 0], [8, 8, 2, 0, 0, 0, 0, 0]], np.int32)
  return jnp.asarray(images), jnp.asarray(tokens)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_embeddings_are_normalised_projections(dtype):
  model = TwoTower(image=IMAGE, text=TEXT, embed_dim=6, temperature_init=10.0, bias_init=-10.0,
                   dtype=dtype)
  images, tokens = _inputs()
  params = nn.meta.unbox(model.init(jax.random.key(0), images, tokens)["params"])
  np.testing.assert_allclose(params["t_prime"], math.log(10.0), rtol=1e-6)
  params = {**R.randomize(params, seed=4), "t_prime": params["t_prime"], "b": params["b"]}
  zimg, ztxt, t, b = model.apply({"params": params}, images, tokens)
  assert zimg.shape == (3, 6) and ztxt.shape == (4, 6)
  assert zimg.dtype == ztxt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(t, 10.0, rtol=1e-6)  # t = exp(t')
  np.testing.assert_allclose(b, -10.0)
  if dtype != jnp.float32:
    return
  # The direction is that of the projected pooled tower output (numpy float64).
  vit = ViT(**IMAGE)
  txt = TextTransformer(**TEXT)
  p = R.f64(params)
  feat_i = np.asarray(vit.apply({"params": params["img"]}, images)[0], np.float64)
  feat_t = np.asarray(txt.apply({"params": params["txt"]}, tokens)[0], np.float64)
  for feat, proj, z in ((feat_i, p["img_proj"], zimg), (feat_t, p["txt_proj"], ztxt)):
    y = R.dense(feat, proj)
    np.testing.assert_allclose(z, y / np.linalg.norm(y, axis=1, keepdims=True), rtol=1e-5,
                               atol=1e-6)
    assert np.linalg.norm(y, axis=1).std() > 1e-2  # unnormalised norms really differ
  # The named methods give the same embeddings.
  np.testing.assert_allclose(model.apply({"params": params}, images, method="embed_images"),
                             zimg, rtol=1e-6)
  np.testing.assert_allclose(model.apply({"params": params}, tokens, method="embed_texts"),
                             ztxt, rtol=1e-6)
