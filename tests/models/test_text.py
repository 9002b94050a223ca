"""The text tower: numpy reference forward, padding invariance, eos / mean pooling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models.text import TextTransformer
from tests.models import _np_reference as R

VOCAB, MAX_LEN, WIDTH = 20, 16, 8
# Real tokens (ids >= 1; 0 is padding) of different lengths, the last one the EOS.
SEQS = [[5, 3, 9, 2], [7, 1], [4, 4, 11, 6, 8, 2]]


def _tokens(length, seqs=SEQS):
  out = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s
  return out


def _model(pool="eos", causal=False):
  return TextTransformer(vocab_size=VOCAB, max_len=MAX_LEN, width=WIDTH, depth=2, num_heads=2,
                         mlp_dim=16, pool=pool, causal=causal)


def _params(model, seed=1):
  params = model.init(jax.random.key(0), jnp.asarray(_tokens(MAX_LEN)))["params"]
  return R.randomize(params, seed=seed)


def _np_forward(params, tokens, pool="eos"):
  p = R.f64(params)
  valid = tokens != 0
  x = p["token_embedding"]["embedding"][tokens] + p["pos_embedding"][0, :tokens.shape[1]]
  mask = valid[:, None, :] & valid[:, :, None]
  x = R.encoder(x, p["encoder"], 2, mask)
  n = valid.sum(1)
  if pool == "eos":
    return x[np.arange(len(x)), n - 1]
  return (x * valid[..., None]).sum(1) / n[:, None]


@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_matches_numpy_reference(pool):
  model = _model(pool)
  params = _params(model)
  tokens = _tokens(10)
  pooled, _ = model.apply({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(pooled, _np_forward(params, tokens, pool), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["eos", "mean"])
def test_padding_after_eos_changes_nothing(pool):
  """The same captions padded to 6, 10 or 16 tokens embed the same: padding is masked out of
  the attention of the real tokens and out of the pooling."""
  model = _model(pool)
  params = _params(model)
  outs = [model.apply({"params": params}, jnp.asarray(_tokens(n))) for n in (6, 10, MAX_LEN)]
  for pooled, per_token in outs[1:]:
    np.testing.assert_allclose(pooled, outs[0][0], rtol=1e-5, atol=1e-5)
    for i, s in enumerate(SEQS):
      np.testing.assert_allclose(per_token[i, :len(s)], outs[0][1][i, :len(s)], rtol=1e-5,
                                 atol=1e-5)
  # The padding would matter if it were attended to: the pooled embedding of a caption is
  # not that of the same caption with a real token where the padding was.
  longer = [s + [13] * (6 - len(s)) for s in SEQS]
  other, _ = model.apply({"params": params}, jnp.asarray(_tokens(6, longer)))
  assert np.abs(np.asarray(other)[:2] - np.asarray(outs[0][0])[:2]).max() > 1e-2


def _pooled_and_per_token(pool):
  model = _model(pool)
  return model.apply({"params": _params(model)}, jnp.asarray(_tokens(12)))


def test_eos_pooling_picks_the_last_real_token():
  pooled, per_token = _pooled_and_per_token("eos")
  for i, s in enumerate(SEQS):
    np.testing.assert_array_equal(pooled[i], per_token[i, len(s) - 1])
    # and not any other position
    others = np.delete(np.asarray(per_token[i]), len(s) - 1, axis=0)
    assert np.abs(others - np.asarray(pooled[i])).max(axis=1).min() > 1e-3


def test_mean_pooling_is_the_masked_mean():
  pooled, per_token = _pooled_and_per_token("mean")
  for i, s in enumerate(SEQS):
    np.testing.assert_allclose(pooled[i], np.asarray(per_token[i, :len(s)]).mean(0),
                               rtol=1e-5, atol=1e-6)


def test_causal_tokens_do_not_see_later_tokens():
  model = _model("eos", causal=True)
  params = _params(model)
  a = _tokens(8, [[5, 3, 9, 2, 7]])
  b = _tokens(8, [[5, 3, 9, 11, 4]])
  _, xa = model.apply({"params": params}, jnp.asarray(a))
  _, xb = model.apply({"params": params}, jnp.asarray(b))
  np.testing.assert_allclose(xa[0, :3], xb[0, :3], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(xa[0, 3:5]) - np.asarray(xb[0, 3:5])).max() > 1e-2
