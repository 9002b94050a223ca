"""The speed / memory knobs leave the math alone: bf16 matmuls (against ``jnp.dot`` on the
same bf16-rounded operands, and against float32 within bf16 tolerance), ``remat`` policies
and ``nn.scan`` (against the unrolled, unremat float32 encoder: same loss, same gradients)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models import matmul
from bigvl.models.transformer import Encoder
from bigvl.models.vit import PatchEmbed

B, L, D, HEADS, MLP, DEPTH = 2, 6, 16, 2, 32, 3


def _bf16_ref(a, b):
  return jnp.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                 preferred_element_type=jnp.float32)


@pytest.mark.parametrize("shape", [((5, 7), (7, 3)), ((2, 3, 5, 7), (2, 3, 7, 4))])
def test_matmul_value_and_grads_match_autodiff_of_the_rounded_dot(shape):
  r = np.random.default_rng(0)
  a, b = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in shape)
  g = jnp.asarray(r.standard_normal(shape[0][:-1] + shape[1][-1:]), jnp.float32)

  def ref(a, b):
    return jnp.einsum("...mk,...kn->...mn", a.astype(jnp.bfloat16), b.astype(jnp.bfloat16),
                      preferred_element_type=jnp.float32)

  np.testing.assert_allclose(matmul.matmul(a, b), ref(a, b), rtol=1e-6, atol=1e-6)
  got = jax.vjp(matmul.matmul, a, b)[1](g)
  # reference backward: the same products with the cotangent rounded to bf16 too
  want = jax.vjp(ref, a, b)[1](g.astype(jnp.bfloat16).astype(jnp.float32))
  for x, y in zip(got, want, strict=True):
    np.testing.assert_allclose(x, y, rtol=2e-2, atol=2e-2)
    assert x.dtype == jnp.float32


def test_materialize_is_a_transpose():
  x = jnp.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
  np.testing.assert_array_equal(matmul.materialize(x, (0, 2, 3, 1)), x.transpose(0, 2, 3, 1))
  np.testing.assert_array_equal(matmul.materialize_t(x), jnp.swapaxes(x, -1, -2))


def test_patch_embed_equals_the_strided_convolution():
  r = np.random.default_rng(1)
  images = jnp.asarray(r.standard_normal((2, 8, 8, 3)), jnp.float32)
  pe = PatchEmbed(4, 6)
  params = nn.meta.unbox(pe.init(jax.random.key(0), images)["params"])
  conv = nn.Conv(6, (4, 4), strides=(4, 4), padding="VALID")
  np.testing.assert_allclose(pe.apply({"params": params}, images),
                             conv.apply({"params": params}, images), rtol=1e-5, atol=1e-5)


def _loss_and_grads(enc, params, x, mask):
  def loss(p, x):
    return jnp.sum(enc.apply({"params": p}, x, mask) ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1))(params, x)


def _stack(params):
  """Unrolled ``block{i}`` parameters -> the scanned layout ``blocks/block`` ``[depth, ...]``."""
  blocks = [params[f"block{i}"] for i in range(DEPTH)]
  return {"blocks": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)},
          "ln_final": params["ln_final"]}


@pytest.fixture(scope="module")
def reference():
  r = np.random.default_rng(2)
  x = jnp.asarray(r.standard_normal((B, L, D)), jnp.float32)
  valid = jnp.asarray([[1] * L, [1] * (L - 2) + [0, 0]], bool)
  mask = nn.make_attention_mask(valid, valid)
  enc = Encoder(DEPTH, HEADS, MLP)
  params = nn.meta.unbox(enc.init(jax.random.key(0), x, mask)["params"])
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(3), p.shape),
                        params)
  return x, mask, params, _loss_and_grads(enc, params, x, mask)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_and_scan_leave_loss_and_grads_unchanged(reference, remat, scan):
  x, mask, params, ((loss, (gp, gx))) = reference
  enc = Encoder(DEPTH, HEADS, MLP, remat=remat, scan=scan)
  p = _stack(params) if scan else params
  if scan:  # init lays parameters out as _stack does
    shapes = jax.tree.map(jnp.shape, nn.meta.unbox(enc.init(jax.random.key(0), x, mask)))
    assert shapes["params"] == jax.tree.map(jnp.shape, p)
  loss2, (gp2, gx2) = _loss_and_grads(enc, p, x, mask)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  np.testing.assert_allclose(gx2, gx, rtol=1e-4, atol=1e-5)
  want = _stack(gp) if scan else gp
  for a, b in zip(jax.tree.leaves(gp2), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_encoder_is_float32_within_bf16_tolerance(reference):
  x, mask, params, ((loss, (gp, gx))) = reference
  enc = Encoder(DEPTH, HEADS, MLP, dtype=jnp.bfloat16)
  loss16, (gp16, gx16) = _loss_and_grads(enc, params, x, mask)
  assert loss16.dtype == jnp.float32 and loss16 != loss  # it really rounds
  np.testing.assert_allclose(loss16, loss, rtol=2e-2)
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(gx16, gx) < 3e-2
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(gp16))
  flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])
  # the whole gradient (some leaves, e.g. the key bias, have a true gradient of ~0)
  assert rel(flat(gp16), flat(gp)) < 3e-2


def test_scan_refuses_a_hidden_layer(reference):
  x, mask, _, _ = reference
  enc = Encoder(DEPTH, HEADS, MLP, scan=True)
  params = enc.init(jax.random.key(0), x, mask)
  with pytest.raises(ValueError, match="scan"):
    enc.apply(params, x, mask, layer=-2)


def test_two_tower_config_knobs_reach_the_towers_and_bad_remat_is_a_config_error():
  import ml_collections as mlc

  from bigvl.config import ConfigError, Reader
  from bigvl.models import two_tower

  def cfg(**image):
    c = mlc.ConfigDict({"image": dict(patch_size=4, width=8, depth=2, num_heads=2, mlp_dim=16,
                                      **image),
                        "text": dict(width=8, depth=2, num_heads=2, mlp_dim=16, scan=True)})
    return Reader(c, "config.model")

  m = two_tower.from_config(cfg(remat="dots", scan=True), vocab_size=10, max_len=4)
  assert m.image["remat"] == "dots" and m.image["scan"] and m.text["scan"]
  with pytest.raises(ConfigError, match="remat"):
    two_tower.from_config(cfg(remat="sometimes"), vocab_size=10, max_len=4)


def test_siglip_size_arg_sets_the_papers_towers_and_refuses_unknown_sizes():
  from bigvl.config import ConfigError, load_config

  c = load_config("configs/siglip_shapes.py:size=b16")
  assert (c.model.image["width"], c.model.image["depth"], c.model.image["num_heads"]) == (
      768, 12, 12)
  assert c.model.image["patch_size"] == 16 and c.input.image_size == 224
  assert c.model.text["vocab_size"] == 32_000 and c.input.max_len == 64
  with pytest.raises(ConfigError, match="size"):
    load_config("configs/siglip_shapes.py:size=h14")
