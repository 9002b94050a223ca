"""Bad input loses nothing: unreadable samples are skipped and counted, non-finite steps are
refused, an unreadable latest checkpoint falls back to the previous one."""

import glob
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigvl import checkpoint, train
from bigvl.data import pipeline, sources
from bigvl.tasks.base import Task


class _Flaky:
  """Records ``bad`` raise on read; every read is logged (index), as a disk would see it."""

  def __init__(self, n, bad):
    self.n, self.bad = n, bad
    self.reads = []
    self._lock = threading.Lock()

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    with self._lock:
      self.reads.append(int(i))
    if i in self.bad:
      raise OSError(f"corrupt record {i}")
    return {"x": np.float32(i)}


@pytest.mark.parametrize("shuffle", [False, True])
def test_unreadable_samples_are_skipped_and_counted(shuffle):
  """10 records, 3 and 7 corrupt: 16 examples are exactly 2 epochs of the 8 good ones, each
  good record twice (once per epoch), the corrupt ones never; every failed read is counted."""
  flaky = _Flaky(10, {3, 7})
  src = sources.SkippingSource(flaky, "flaky")
  it = pipeline.train_iterator(src, lambda ex, rng: ex, batch_size=4, seed=0, num_threads=1,
                               shuffle=shuffle)
  seen = np.concatenate([next(it)["x"] for _ in range(4)]).astype(int).tolist()
  good = [0, 1, 2, 4, 5, 6, 8, 9]
  assert sorted(seen[:8]) == good and sorted(seen[8:]) == good  # epoch by epoch
  if not shuffle:
    assert seen == good + good
  # Prefetching may have read ahead: the count is that of the failed reads so far, and at
  # least those the batches above went past (both epochs' without shuffling; the first
  # epoch's with, where the second epoch's corrupt records may come after its last good one).
  with flaky._lock:
    failed = sum(i in flaky.bad for i in flaky.reads)
  assert it.num_skipped == src.num_skipped == failed >= (2 if shuffle else 4)


class _Linear(Task):
  """loss = mean((w x - y)^2) / d : d == 0 makes it non-finite."""

  def init(self, rng, batch):
    return {"w": jnp.ones((3,))}, {}

  def loss(self, params, state, batch, rng, step):
    err = batch["x"] @ params["w"] - batch["y"]
    return jnp.mean(err ** 2) / batch["d"][0], ({}, state)


def _state(params):
  tx = optax.sgd(0.1)
  return tx, {"params": params, "frozen": {}, "opt_state": tx.init(params), "extra": {},
              "step": jnp.zeros((), jnp.int32), "rng": jax.random.PRNGKey(0),
              "skipped": jnp.zeros((), jnp.int32)}


def test_non_finite_step_is_refused_and_counted():
  task = _Linear(None, None)
  tx, state = _state({"w": jnp.ones((3,))})
  step = jax.jit(train.make_train_step(task, tx, optax.constant_schedule(0.1)))
  x = np.ones((4, 3), np.float32)
  bad = {"x": x, "y": np.zeros(4, np.float32), "d": np.zeros(4, np.float32)}
  good = {**bad, "d": np.ones(4, np.float32)}
  state, aux = step(state, bad)
  np.testing.assert_array_equal(state["params"]["w"], np.ones(3))  # unchanged
  assert int(aux["skipped_steps"]) == 1 and int(state["step"]) == 1
  assert not np.isfinite(float(aux["loss"]))
  state, aux = step(state, good)
  # d loss/dw = 2/4 sum_i (w.x_i - y_i) x_i = 2*3 = 6 per weight -> w = 1 - 0.1*6
  np.testing.assert_allclose(state["params"]["w"], np.full(3, 0.4), rtol=1e-6)
  assert int(aux["skipped_steps"]) == 1


def test_non_finite_update_from_finite_gradients_is_refused():
  """lr = inf: the loss and the gradient are finite, the update is not; the old state stays
  (without the learning-rate check the params become -inf and the step counts as good)."""
  task = _Linear(None, None)
  params = {"w": jnp.ones((3,))}
  tx = optax.sgd(np.inf)
  state = {**_state(params)[1], "opt_state": tx.init(params)}
  step = jax.jit(train.make_train_step(task, tx, optax.constant_schedule(np.inf)))
  x = np.ones((4, 3), np.float32)
  state, aux = step(state, {"x": x, "y": np.zeros(4, np.float32), "d": np.ones(4, np.float32)})
  assert np.isfinite(float(aux["loss"])) and np.isfinite(float(aux["grad_norm"]))
  assert int(aux["skipped_steps"]) == 1
  np.testing.assert_array_equal(state["params"]["w"], np.ones(3))


def test_unreadable_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3, async_save=False)
  tree = {"a": jnp.arange(4.0), "b": jnp.zeros((2, 2))}
  ckpt.save(1, tree, {"next_index": 10})
  ckpt.save(2, jax.tree.map(lambda x: x + 1, tree), {"next_index": 20})
  ckpt.wait()
  for f in glob.glob(os.path.join(ckpt.directory, "2", "state", "**", "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), tree)
  fresh = checkpoint.Checkpointer(str(tmp_path), keep=3)
  with caplog.at_level("WARNING"):
    step, state, data_state = fresh.restore_latest(abstract)
  assert step == 1 and data_state == {"next_index": 10}
  np.testing.assert_array_equal(state["a"], np.arange(4.0))
  assert "step 2" in caplog.text and "unreadable" in caplog.text
  fresh.close()
  ckpt.close()


def test_microbatched_step_equals_full_batch():
  task = _Linear(None, None)
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(8, 3)).astype(np.float32),
           "y": rng.normal(size=8).astype(np.float32), "d": np.ones(8, np.float32)}
  outs = []
  for m in (1, 4):
    tx, state = _state({"w": jnp.asarray([0.5, -1.0, 2.0])})
    step = jax.jit(train.make_train_step(task, tx, optax.constant_schedule(0.1), m))
    new, aux = step(state, batch)
    outs.append((np.asarray(new["params"]["w"]), float(aux["loss"])))
  np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6)
  np.testing.assert_allclose(outs[1][1], outs[0][1], rtol=1e-6)
  assert not np.allclose(outs[0][0], [0.5, -1.0, 2.0])
