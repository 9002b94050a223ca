"""Trainable/frozen split: frozen parameters get no gradient and no optimizer state (the
compiled step's memory shows it), stay bit-identical, and the logged gradient norm is the one
clipping uses (trainable parameters only)."""

import jax
import numpy as np
import optax
import pytest

from bigvl import parallel, train
from tests.helpers import tiny_config

ALL_BUT_ONE_LAYER = ("^(?!img/encoder/block0/mlp/)",)


def _compiled(data_dir, frozen=None, **overrides):
  c = tiny_config(data_dir, **{"mesh.data": 1, **overrides})
  c.evals = {}
  if frozen:
    c.optim.frozen = frozen
  run = train.build(c, devices=jax.devices()[:1])
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  return run, fns, fns.init(batch), batch, data


def _nbytes(tree):
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_frozen_parameters_cost_no_gradient_or_optimizer_memory(shapes_data_dir):
  _, fns_all, s_all, batch, _ = _compiled(shapes_data_dir)
  _, fns_fr, s_fr, _, _ = _compiled(shapes_data_dir, ALL_BUT_ONE_LAYER)
  frozen_bytes = _nbytes(s_fr["frozen"])
  assert s_all["frozen"] == {} and frozen_bytes > 0.8 * _nbytes(s_all["params"])
  assert _nbytes(s_fr["params"]) + frozen_bytes == _nbytes(s_all["params"])  # one layer left
  # Adam keeps two moments per trainable parameter and none for frozen ones.
  assert _nbytes(s_all["opt_state"]) - _nbytes(s_fr["opt_state"]) == 2 * frozen_bytes
  m_all = fns_all.step.lower(s_all, batch).compile().memory_analysis()
  m_fr = fns_fr.step.lower(s_fr, batch).compile().memory_analysis()
  # XLA's own accounting: the state the step takes shrinks by the frozen optimizer bytes, and
  # its scratch space by at least the frozen gradients.
  assert m_all.argument_size_in_bytes - m_fr.argument_size_in_bytes == 2 * frozen_bytes
  assert m_all.temp_size_in_bytes - m_fr.temp_size_in_bytes >= frozen_bytes


def test_frozen_parameters_stay_bit_identical_and_the_rest_trains(shapes_data_dir):
  _, fns, state, batch, data = _compiled(shapes_data_dir, ALL_BUT_ONE_LAYER)
  frozen0 = parallel.to_host(state["frozen"])
  trained0 = parallel.to_host(state["params"])
  mesh = jax.tree.leaves(state["params"])[0].sharding.mesh
  for _ in range(3):
    state, aux = fns.step(state, parallel.global_batch(next(data), mesh))
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(state["frozen"]), frozen0)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       parallel.to_host(state["params"]), trained0)
  assert all(jax.tree.leaves(moved))
  assert list(state["params"]) == ["img"]  # only the one layer is trainable


def test_logged_grad_norm_is_over_trainable_parameters(shapes_data_dir):
  """The norm the loop logs is the norm clipping sees: frozen parameters have no gradient."""
  run, fns, state, batch, _ = _compiled(shapes_data_dir, ALL_BUT_ONE_LAYER,
                                        **{"optim.clip_norm": 0.0})
  params = train.model_params(state)

  def loss(trainable):
    return run.task.loss(train.merge_params(trainable, state["frozen"]), state["extra"], batch,
                         jax.random.fold_in(state["rng"], 0), 0)[0]

  want = float(optax.global_norm(jax.jit(jax.grad(loss))(state["params"])))
  full = float(optax.global_norm(jax.jit(jax.grad(
      lambda p: run.task.loss(p, state["extra"], batch, jax.random.fold_in(state["rng"], 0),
                              0)[0]))(params)))
  _, aux = fns.step(state, batch)
  assert float(aux["grad_norm"]) == pytest.approx(want, rel=1e-5)
  assert full > 1.5 * want  # the frozen layers' gradients would have changed the number


def test_split_and_merge_are_inverse():
  params = {"a": {"lora": np.ones(2), "w": np.zeros(3)}, "b": np.ones(1), "c": {"d": {"e": 1.0}}}
  t, f = train.split_params(params, lambda p: "lora" not in p)
  assert t == {"a": {"lora": params["a"]["lora"]}}
  assert set(f) == {"a", "b", "c"} and "lora" not in f["a"]
  merged = train.merge_params(t, f)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
