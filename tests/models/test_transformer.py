"""The shared encoder against a plain numpy float64 transformer with the same weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigvl.models.transformer import Encoder, EncoderBlock, MAPHead
from tests.models import _np_reference as R

B, L, D, HEADS, MLP = 2, 5, 8, 2, 16


def _init(module, *args):
  params = module.init(jax.random.key(0), *args)["params"]
  return R.randomize(params, seed=1)


def _padding_mask(valid):
  """[B, L] bool -> [B, L, L]: real queries attend to real keys only."""
  return valid[:, None, :] & valid[:, :, None]


def test_block_matches_numpy_attention():
  x = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
  block = EncoderBlock(HEADS, MLP)
  params = _init(block, x)
  got = block.apply({"params": params}, x)
  want = R.encoder_block(x.astype(np.float64), R.f64(params))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The attention really mixes positions: a change at one position moves the others.
  x2 = x.copy()
  x2[:, 0] = np.random.default_rng(9).normal(size=(B, D))
  moved = np.abs(np.asarray(block.apply({"params": params}, x2)) - np.asarray(got))[:, 1:]
  assert moved.max() > 1e-2


def test_block_with_padding_mask_matches_numpy():
  x = np.random.default_rng(1).normal(size=(B, L, D)).astype(np.float32)
  valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  block = EncoderBlock(HEADS, MLP)
  params = _init(block, x)
  got = np.asarray(block.apply({"params": params}, x, nn.make_attention_mask(valid, valid)))
  want = R.encoder_block(x.astype(np.float64), R.f64(params), _padding_mask(valid))
  # Rows of padding queries attend to nothing and are never read: compare the real rows.
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)
  unmasked = np.asarray(block.apply({"params": params}, x))
  assert np.abs(unmasked[0, :3] - got[0, :3]).max() > 1e-2  # the mask matters here


def test_encoder_stack_matches_numpy():
  x = np.random.default_rng(2).normal(size=(B, L, D)).astype(np.float32)
  enc = Encoder(depth=2, num_heads=HEADS, mlp_dim=MLP)
  params = _init(enc, x)
  got = enc.apply({"params": params}, x)
  np.testing.assert_allclose(got, R.encoder(x.astype(np.float64), R.f64(params), 2),
                             rtol=1e-5, atol=1e-5)
  # remat is a memory knob, not another model.
  remat = Encoder(depth=2, num_heads=HEADS, mlp_dim=MLP, remat=True)
  np.testing.assert_allclose(remat.apply({"params": params}, x), got, rtol=1e-6, atol=1e-6)


def test_map_head_matches_numpy():
  """MAP pooling: a learned probe attends over the tokens, then a residual MLP."""
  x = np.random.default_rng(3).normal(size=(B, L, D)).astype(np.float32)
  head = MAPHead(HEADS, MLP)
  params = _init(head, x)
  p = R.f64(params)
  probe = np.broadcast_to(p["probe"], (B, 1, D))
  y = R.mha(probe, x.astype(np.float64), p["attn"])
  y = y + R.mlp(R.layer_norm(y, p["ln"]), p["mlp"])
  np.testing.assert_allclose(head.apply({"params": params}, x), y[:, 0], rtol=1e-5, atol=1e-5)


def test_bf16_block_computes_in_bf16():
  x = jnp.ones((B, L, D))
  block = EncoderBlock(HEADS, MLP, dtype=jnp.bfloat16)
  params = block.init(jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  hlo = jax.jit(lambda p, x: block.apply({"params": p}, x)).lower(params, x).as_text()
  assert "bf16" in hlo and "dot_general" in hlo
