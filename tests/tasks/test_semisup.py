"""Semi-supervised task: every method takes a sharded step on 8 devices; Mean Teacher's teacher
survives checkpoint/resume; the labeled / unlabeled / test split is what it claims."""

import os

import jax
import numpy as np
import pytest

from bigvl import checkpoint, parallel, train
from bigvl.config import ConfigError, load_sibling
from bigvl.data import digits
from bigvl.tasks import semisup
from tests.helpers import REPO


def tiny_ssl_config(method, **overrides):
  """``configs/semisup_mnist.py:<method>,tiny`` shrunk to seconds: 8x8 digits, batch 8,
  a 2-stage width-4 SmallCNN, mu 1."""
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist").get_config(
      f"{method},tiny")
  c.input.dataset = "embedded:digits8x8"
  c.input.mean, c.input.std = (0.3,), (0.4,)
  c.input.batch_size = 8
  c.input.num_labels = 50
  c.model.width, c.model.stages = 4, 2
  c.total_steps, c.log_every, c.ckpt_every = 4, 1, 2
  c.evals.test.batch_size = 96
  c.evals.test.every = 4
  if "mu" in c.semisup:
    c.semisup.mu = 1
  if "num_augs" in c.semisup:
    c.semisup.num_augs = 2
  if "rampup_steps" in c.semisup:
    c.semisup.rampup_steps = 2
  c.update_from_flattened_dict(overrides)
  return c


def _one_step(config, devices=None):
  run = train.build(config, devices=devices)
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  before = parallel.to_host(state)
  new, aux = fns.step(state, batch)
  return run, before, parallel.to_host(new), jax.device_get(aux)


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                      strict=True))


@pytest.mark.parametrize("method", semisup.METHODS)
def test_each_method_takes_a_sharded_step(method):
  assert jax.device_count() == 8
  run, before, after, aux = _one_step(tiny_ssl_config(method))
  assert dict(run.mesh.shape)["data"] == 8
  assert np.isfinite(aux["loss"]) and aux["skipped_steps"] == 0, aux
  assert int(after["step"]) == 1
  assert _changed(before["params"], after["params"])
  assert _changed(before["extra"]["batch_stats"], after["extra"]["batch_stats"])
  if method != "supervised":
    assert "unsup_loss" in aux and np.isfinite(aux["unsup_loss"])
  extra = after["extra"]
  if method == "mean_teacher":
    # Step 0's EMA decay is 0.5 (the Mean Teacher code's warm-up): halfway to the student.
    t0, s1 = before["extra"]["teacher"]["params"], after["params"]
    jax.tree.map(lambda t, t_new, s: np.testing.assert_allclose(t_new, 0.5 * t + 0.5 * s,
                                                                rtol=1e-5, atol=1e-6),
                 t0, extra["teacher"]["params"], s1)
  if method == "temporal_ensembling":
    n_u = len(run.task.unlabeled)
    assert extra["ensemble"].shape == (n_u, 10) and extra["ensemble_count"].shape == (n_u,)
    seen = extra["ensemble_count"] > 0
    assert 0 < seen.sum() <= 8 and np.allclose(extra["ensemble"][seen].sum(-1), 0.4, atol=1e-5)


def test_fixmatch_sharded_step_equals_single_device():
  sgd = {"optim.name": "sgd", "optim.lr": 0.5, "optim.wd": 0.0}
  _, b1, a1, x1 = _one_step(tiny_ssl_config("fixmatch", **sgd), jax.devices()[:1])
  _, b8, a8, x8 = _one_step(tiny_ssl_config("fixmatch", **sgd))
  jax.tree.map(np.testing.assert_array_equal, b1["params"], b8["params"])
  np.testing.assert_allclose(x8["loss"], x1["loss"], rtol=1e-5)
  np.testing.assert_allclose(x8["mask"], x1["mask"])
  # BN statistics are over the global batch, so the sharded update equals the unsharded one.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               a1["extra"]["batch_stats"], a8["extra"]["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               a1["params"], a8["params"])


def test_mean_teacher_survives_checkpoint_and_resume(tmp_path, monkeypatch):
  saved, restored = {}, {}
  orig_save, orig_restore = checkpoint.Checkpointer.save, checkpoint.Checkpointer.restore_latest

  def spy_save(self, step, state, data_state):
    saved[step] = parallel.to_host({"teacher": state["extra"]["teacher"],
                                    "params": state["params"]})
    return orig_save(self, step, state, data_state)

  def spy_restore(self, abstract_state):
    out = orig_restore(self, abstract_state)
    if out is not None:
      restored["step"], restored["state"] = out[0], parallel.to_host(out[1])
    return out

  monkeypatch.setattr(checkpoint.Checkpointer, "save", spy_save)
  monkeypatch.setattr(checkpoint.Checkpointer, "restore_latest", spy_restore)
  workdir = str(tmp_path / "mt")
  first = train.train(tiny_ssl_config("mean_teacher", total_steps=4), workdir)
  assert sorted(saved) == [2, 4] and not restored
  assert {"test/accuracy", "test/error", "test/teacher_accuracy", "test/teacher_error"} <= set(
      first)
  assert 0 <= first["test/teacher_error"] <= 1

  second = train.train(tiny_ssl_config("mean_teacher", total_steps=6), workdir)
  assert restored["step"] == 4 and sorted(saved) == [2, 4, 6]
  teacher = restored["state"]["extra"]["teacher"]
  jax.tree.map(np.testing.assert_array_equal, teacher, saved[4]["teacher"])
  assert _changed(teacher["params"], restored["state"]["params"])  # teacher != student
  assert _changed(saved[6]["teacher"], saved[4]["teacher"])  # and it kept training
  assert "test/teacher_error" in second


@pytest.mark.parametrize("dataset, num_labels", [("digits8x8", 50), ("mnist5k", 100)])
def test_labeled_unlabeled_test_split(dataset, num_labels):
  run = train.build(tiny_ssl_config("fixmatch", **{"input.dataset": f"embedded:{dataset}",
                                                   "input.num_labels": num_labels}))
  task = run.task
  train_labels = digits.load_split(dataset, "train").labels
  lab, unl = task.labeled_idx, task.unlabeled_idx
  # Class-balanced labeled subset; unlabeled = the rest of the train split, disjoint.
  np.testing.assert_array_equal(np.bincount(train_labels[lab], minlength=10), num_labels // 10)
  assert len(np.intersect1d(lab, unl)) == 0
  np.testing.assert_array_equal(np.union1d(lab, unl), np.arange(len(train_labels)))
  # The examples the streams give are those: labels match, ``index`` is the unlabeled row.
  assert [task.labeled[i]["label"] for i in range(len(lab))] == list(train_labels[lab])
  ex = task.unlabeled[7]
  assert ex["index"] == 7 and ex["label"] == train_labels[unl[7]]
  # The test split (what the evaluator reads) is never in train, by full-dataset index.
  full_train = digits.split_indices(dataset, "train")
  test = digits.split_indices(dataset, "test")
  assert len(np.intersect1d(full_train[np.concatenate([lab, unl])], test)) == 0
  ev = run.evaluators[0][1]
  assert len(ev.source) == len(test)
  # Another seed draws another labeled set (the seed is the default label seed).
  other = train.build(tiny_ssl_config("fixmatch", **{"input.dataset": f"embedded:{dataset}",
                                                     "input.num_labels": num_labels,
                                                     "seed": 1})).task
  assert not np.array_equal(other.labeled_idx, lab)


def test_two_stream_iterator_resumes_exactly():
  task = train.build(tiny_ssl_config("uda")).task
  data = task.train_data(0)
  for _ in range(3):
    next(data)
  state = data.get_state()
  assert set(state) == {"labeled", "unlabeled"}
  want = [next(data) for _ in range(2)]
  fresh = task.train_data(0)
  fresh.set_state(state)
  got = [next(fresh) for _ in range(2)]
  jax.tree.map(np.testing.assert_array_equal, want, got)
  b = want[0]
  assert b["labeled"]["image"].shape == (8, 8, 8, 1)
  assert b["unlabeled"]["image"].shape == (8, 2, 8, 8, 1)  # weak and strong views
  assert not np.array_equal(b["unlabeled"]["image"][:, 0], b["unlabeled"]["image"][:, 1])


def test_config_errors():
  c = tiny_ssl_config("fixmatch")
  c.semisup.ema_decay = 0.9  # a Mean Teacher knob
  with pytest.raises(ConfigError, match="ema_decay.*fixmatch"):
    train.build(c)
  c = tiny_ssl_config("fixmatch")
  c.method = "no_such_method"
  with pytest.raises(ConfigError, match="no_such_method"):
    train.build(c)
  with pytest.raises(ConfigError, match="num_labels"):
    train.build(tiny_ssl_config("fixmatch", **{"input.num_labels": 15}))
  cfg = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist")
  assert cfg.get_config("method=vat,tiny").method == "vat"
  assert cfg.get_config("mixmatch").model.name == "wide_resnet"
