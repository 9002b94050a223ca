"""The ViT image tower against a numpy float64 forward pass; gap / map / tok pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models.vit import ViT
from tests.models import _np_reference as R

B, SIZE, PATCH, WIDTH = 2, 8, 4, 8


def _images(seed=0):
  return np.random.default_rng(seed).normal(size=(B, SIZE, SIZE, 3)).astype(np.float32)


def _model(pool):
  return ViT(patch_size=PATCH, width=WIDTH, depth=2, num_heads=2, mlp_dim=16, pool=pool)


def _np_tokens(params, images, cls=False):
  """Patchify (non-overlapping p x p patches, row-major) -> linear -> (+cls) -> + pos ->
  encoder."""
  p = R.f64(params)
  x = images.astype(np.float64)
  g = SIZE // PATCH
  patches = x.reshape(B, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(B, g * g, PATCH * PATCH * 3)
  kernel = p["embedding"]["kernel"].reshape(PATCH * PATCH * 3, WIDTH)
  tokens = patches @ kernel + p["embedding"]["bias"]
  if cls:
    tokens = np.concatenate([np.broadcast_to(p["cls"], (B, 1, WIDTH)), tokens], axis=1)
  return R.encoder(tokens + p["pos_embedding"], p["encoder"], 2)


@pytest.mark.parametrize("pool", ["gap", "map", "tok"])
def test_matches_numpy_reference(pool):
  model = _model(pool)
  images = _images()
  params = R.randomize(model.init(jax.random.key(0), jnp.asarray(images))["params"], seed=2)
  pooled, tokens = model.apply({"params": params}, jnp.asarray(images))
  want_tokens = _np_tokens(params, images, cls=pool == "tok")
  assert tokens.shape == (B, (SIZE // PATCH) ** 2 + (pool == "tok"), WIDTH)
  np.testing.assert_allclose(tokens, want_tokens, rtol=1e-5, atol=1e-5)
  if pool == "gap":
    want = want_tokens.mean(axis=1)
  elif pool == "tok":
    want = want_tokens[:, 0]
  else:
    h = R.f64(params)["map_head"]
    probe = np.broadcast_to(h["probe"], (B, 1, WIDTH))
    y = R.mha(probe, want_tokens, h["attn"])
    want = (y + R.mlp(R.layer_norm(y, h["ln"]), h["mlp"]))[:, 0]
  np.testing.assert_allclose(pooled, want, rtol=1e-5, atol=1e-5)
  # Pooled features differ from every single token (a pooling that reads one token of the
  # patch sequence would not).
  if pool != "tok":
    assert np.abs(np.asarray(tokens) - np.asarray(pooled)[:, None]).max(-1).min() > 1e-3


def test_patch_order_matters():
  """Position embeddings make the tower see where a patch is: swapping two patches changes
  the output."""
  model = _model("gap")
  images = _images(1)
  params = R.randomize(model.init(jax.random.key(0), jnp.asarray(images))["params"], seed=3)
  swapped = images.copy()
  swapped[:, :PATCH, :PATCH], swapped[:, :PATCH, PATCH:] = (images[:, :PATCH, PATCH:],
                                                            images[:, :PATCH, :PATCH])
  a, _ = model.apply({"params": params}, jnp.asarray(images))
  b, _ = model.apply({"params": params}, jnp.asarray(swapped))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-2


def test_unknown_pool():
  with pytest.raises(ValueError, match="pool"):
    _model("cls").init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
