"""SmallCNN: same interface as WideResNet, any small input size, batch-norm behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.models.small_cnn import SmallCNN


@pytest.mark.parametrize("shape,n_params", [((2, 28, 28, 1), 94_186), ((2, 8, 8, 1), 94_186),
                                            ((2, 32, 32, 3), 94_762)])
def test_shapes_and_size(shape, n_params):
  model = SmallCNN(num_classes=10)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = model.init(jax.random.key(1), x, train=False)
  assert sum(p.size for p in jax.tree_util.tree_leaves(variables["params"])) == n_params
  out = model.apply(variables, x, train=False)
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  out, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert out.shape == (2, 10)
  changed = [np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(upd["batch_stats"]),
      jax.tree_util.tree_leaves(variables["batch_stats"]), strict=True)]
  assert all(changed)


def test_dropout_needs_rng_only_in_train():
  model = SmallCNN(num_classes=3, width=4, dropout_rate=0.5)
  x = jnp.ones((2, 8, 8, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  model.apply(variables, x, train=False)
  out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1)})
  assert out.shape == (2, 3)


def test_dropout_acts_in_train_mode_only():
  """Train mode: different dropout rngs give different logits, the same rng the same ones,
  and the mean over many masks is the logits without dropout (inverted dropout scales kept
  units by 1 / (1 - rate)). Eval mode: the logits of the same model without dropout."""
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  model = SmallCNN(num_classes=5, width=8, dropout_rate=0.5)
  plain = SmallCNN(num_classes=5, width=8, dropout_rate=0.0)
  variables = model.init(jax.random.key(0), x, train=False)

  def train_logits(key):
    return model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": key})[0]

  a, b, a2 = (train_logits(jax.random.key(k)) for k in (1, 2, 1))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  np.testing.assert_array_equal(a, a2)
  no_drop = plain.apply(variables, x, train=True, mutable=["batch_stats"])[0]
  mean = jax.jit(jax.vmap(train_logits))(jax.random.split(jax.random.key(3), 1000)).mean(0)
  scale = float(np.abs(np.asarray(a) - np.asarray(no_drop)).max())
  np.testing.assert_allclose(mean, no_drop, atol=0.1 * scale)

  ev = model.apply(variables, x, train=False)
  np.testing.assert_allclose(ev, plain.apply(variables, x, train=False), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(ev, model.apply(variables, x, train=False,
                                                rngs={"dropout": jax.random.key(5)}))


def test_stage_dropout_after_inner_downsampling_stages_only():
  """``stage_dropout`` adds no parameters, acts in train mode only, and only after stages
  ``1 .. stages - 2``: a 2-stage net has no such stage, so its train-mode logits do not
  depend on the dropout rng; a 3-stage net's do."""
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  for stages, acts in ((2, False), (3, True)):
    model = SmallCNN(num_classes=5, width=8, stages=stages, stage_dropout=0.5)
    plain = SmallCNN(num_classes=5, width=8, stages=stages)
    variables = model.init(jax.random.key(0), x, train=False)
    assert jax.tree.structure(variables) == jax.tree.structure(
        plain.init(jax.random.key(0), x, train=False))
    a, b = (model.apply(variables, x, train=True, mutable=["batch_stats"],
                        rngs={"dropout": jax.random.key(k)})[0] for k in (1, 2))
    assert (np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3) == acts
    np.testing.assert_allclose(model.apply(variables, x, train=False),
                               plain.apply(variables, x, train=False), rtol=1e-6, atol=1e-6)
