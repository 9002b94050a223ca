"""The hand-written attention backward (bigvl.models.attention) against autodiff of flax's
``dot_product_attention``: values and all three gradients, with and without a padding mask,
for self- and cross-attention shapes, and inside the encoder's MultiHeadDotProductAttention."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models import attention


def _qkv(lq, lk, b=2, h=3, d=8, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.standard_normal((b, lq, h, d)), jnp.float32)
  k, v = (jnp.asarray(r.standard_normal((b, lk, h, d)), jnp.float32) for _ in range(2))
  g = jnp.asarray(r.standard_normal((b, lq, h, d)), jnp.float32)
  return q, k, v, g


def _padding_mask(b, lq, lk):
  valid_k = jnp.arange(lk)[None, :] < jnp.asarray([lk, lk - 3])[:b, None]
  return nn.make_attention_mask(jnp.ones((b, lq), bool), valid_k)


@pytest.mark.parametrize("lq, lk, masked", [(7, 7, False), (7, 7, True), (1, 9, False),
                                            (5, 9, True)])
def test_value_and_gradients_match_autodiff_of_flax(lq, lk, masked):
  q, k, v, g = _qkv(lq, lk)
  mask = _padding_mask(2, lq, lk) if masked else None
  want, want_vjp = jax.vjp(lambda q, k, v: nn.dot_product_attention(q, k, v, mask=mask),
                           q, k, v)
  got, got_vjp = jax.vjp(lambda q, k, v: attention.dot_product_attention(q, k, v, mask),
                         q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for a, b in zip(got_vjp(g), want_vjp(g), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_masked_keys_get_no_weight_and_no_gradient():
  q, k, v, _ = _qkv(4, 6)
  mask = _padding_mask(2, 4, 6)  # example 1: its last 3 keys are padding
  def loss(k, v):
    return jnp.sum(attention.dot_product_attention(q, k, v, mask) ** 2)
  dk, dv = jax.grad(loss, argnums=(0, 1))(k, v)
  assert float(jnp.abs(dk[1, 3:]).max()) == 0.0 and float(jnp.abs(dv[1, 3:]).max()) == 0.0
  assert float(jnp.abs(dk[1, :3]).max()) > 0.0
  shifted = v.at[1, 3:].add(100.0)  # changing padded values changes nothing
  np.testing.assert_allclose(attention.dot_product_attention(q, k, shifted, mask),
                             attention.dot_product_attention(q, k, v, mask), atol=1e-6)


def test_multihead_module_with_the_fast_attention_equals_flax_default():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, 12)), jnp.float32)
  mask = _padding_mask(2, 5, 5)
  fast = nn.MultiHeadDotProductAttention(num_heads=3, attention_fn=attention.attention_fn)
  ref = nn.MultiHeadDotProductAttention(num_heads=3)
  params = ref.init(jax.random.key(0), x, x, mask=mask)
  def loss(m, p):
    return jnp.sum(m.apply(p, x, x, mask=mask) ** 2)
  np.testing.assert_allclose(loss(fast, params), loss(ref, params), rtol=1e-5)
  gf, gr = jax.grad(lambda p: loss(fast, p))(params), jax.grad(lambda p: loss(ref, p))(params)
  for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bias_and_dropout_are_refused():
  q, k, v, _ = _qkv(3, 3)
  with pytest.raises(ValueError, match="bias"):
    attention.attention_fn(q, k, v, bias=jnp.zeros((1, 1, 3, 3)))
  with pytest.raises(ValueError, match="dropout"):
    attention.attention_fn(q, k, v, dropout_rate=0.1, deterministic=False)
