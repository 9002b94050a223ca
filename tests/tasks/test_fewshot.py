"""Few-shot pre-training (``bigvl.tasks.fewshot``) on ``shapes_fewshot/small``: base classes
are relabeled 0..K-1 and only the train split's classes are read, the CE baseline has no
contrastive parameters, the sharded SCL step equals the 1-device step, and the tiny config
trains end to end and then serves as the teacher of the distillation stage (whose teacher
weights are the finished run's, bitwise)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from bigvl import parallel, train
from bigvl.config import ConfigError, load_sibling
from bigvl.data.builders import shapes_fewshot
from tests.helpers import REPO, one_step, run_main


def scl_config(data_dir, arg="tiny", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "scl_shapes").get_config(arg)
  c.update_from_flattened_dict({"input.data_dir": data_dir, "input.batch_size": 8,
                                "model.widths": (4, 8, 8, 16), **overrides})
  c.evals = {}
  return c


def test_base_classes_relabeled_and_ce_has_no_contrastive_head(fewshot_data_dir):
  run = train.build(scl_config(fewshot_data_dir, "tiny,ce"), devices=jax.devices()[:1])
  task = run.task
  assert tuple(task.classes) == shapes_fewshot.TRAIN_CLASSES
  batch = next(task.train_data(0))
  assert batch["image"].shape == (8, 2, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].min() >= 0 and batch["label"].max() < len(shapes_fewshot.TRAIN_CLASSES)
  params, _ = jax.eval_shape(task.init, jax.random.key(0), batch)
  assert set(params) == {"net"}
  scl = train.build(scl_config(fewshot_data_dir), devices=jax.devices()[:1]).task
  params, _ = jax.eval_shape(scl.init, jax.random.key(0), batch)
  assert set(params) == {"net", "spatial"}
  assert task.examples_per_step == 16


def test_bad_knob_is_a_config_error(fewshot_data_dir):
  with pytest.raises(ConfigError, match="temperature"):
    train.build(scl_config(fewshot_data_dir, **{"fewshot.temperature": 0.0}),
                devices=jax.devices()[:1])
  with pytest.raises(ConfigError, match="not a knob"):
    train.build(scl_config(fewshot_data_dir, **{"fewshot.spatial": 1.0}),
                devices=jax.devices()[:1])


def test_sharded_scl_step_equals_single_device(fewshot_data_dir):
  """The pairwise spatial similarity spans the whole global batch: 8 data shards give the
  same loss terms and update as 1 device (dropout / DropBlock off: their masks are drawn per
  shard shape)."""
  cfg = {"optim.wd": 0.0, "model.drop_rate": 0.0, "fewshot.global_weight": 1.0}
  _, _, _, a1, x1 = one_step(scl_config(fewshot_data_dir, **cfg, **{"mesh.data": 1}),
                             jax.devices()[:1])
  run, _, _, a8, x8 = one_step(scl_config(fewshot_data_dir, **cfg))
  assert dict(run.mesh.shape)["data"] == 8
  for key in ("loss", "ce_loss", "spatial_loss", "global_loss"):
    np.testing.assert_allclose(x8[key], x1[key], rtol=5e-4, atol=1e-6, err_msg=key)
  assert x1["spatial_loss"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               a1["params"], a8["params"])


@pytest.fixture(scope="module")
def tiny_scl_run(fewshot_data_dir, tmp_path_factory):
  """``configs/scl_shapes.py:tiny`` (narrower, 30 steps) trained once: its workdir."""
  workdir = str(tmp_path_factory.mktemp("scl_tiny"))
  res = run_main(["--config", os.path.join(REPO, "configs/scl_shapes.py:tiny,steps=30"),
                  "--workdir", workdir, f"--config.input.data_dir={fewshot_data_dir}",
                  "--config.model.widths=(4, 8, 8, 16)", "--config.evals.fewshot.episodes=50"])
  assert res.returncode == 0, res.stderr[-3000:]
  return workdir


@pytest.mark.slow
def test_tiny_config_trains_and_evaluates_episodes(tiny_scl_run):
  with open(os.path.join(tiny_scl_run, "results.json")) as f:
    results = json.load(f)
  for k in (1, 5):
    acc, ci = results[f"fewshot/acc_5way_{k}shot"], results[f"fewshot/ci95_5way_{k}shot"]
    assert 0.2 < acc <= 1.0 and 0 < ci < 0.1  # above 5-way chance, 50 episodes
  assert results["fewshot/acc_5way_5shot"] > results["fewshot/acc_5way_1shot"] - 0.05


def test_distillation_reads_the_teacher_bitwise(fewshot_data_dir, tmp_path):
  """The distillation stage's frozen teacher is the saved run's backbone and BN statistics,
  bitwise (not the fresh student), and the official stage's loss composition is on."""
  from bigvl import checkpoint

  # a "finished run": a fresh init of another seed, BN statistics moved off their init
  run = train.build(scl_config(fewshot_data_dir, "tiny,ce"), devices=jax.devices()[:1])
  params, extra = parallel.unbox(run.task.init(jax.random.key(7),
                                                next(run.task.train_data(0))))
  saved = jax.device_get({"params": params, "extra": jax.tree.map(lambda x: x + 0.5, extra),
                          "step": np.int32(1)})
  ckpt = checkpoint.Checkpointer(str(tmp_path / "teacher"))
  ckpt.save(1, saved, {})
  ckpt.close()
  cfg = scl_config(fewshot_data_dir, f"tiny,teacher={tmp_path / 'teacher'}")
  run, _, before, _, aux = one_step(cfg, jax.devices()[:1])
  assert run.task.k["ce_weight"] == 0 and run.task.num_views == 1
  teacher = before["extra"]["teacher"]
  jax.tree.map(np.testing.assert_array_equal, teacher["params"], saved["params"]["net"])
  jax.tree.map(np.testing.assert_array_equal, teacher["batch_stats"],
               saved["extra"]["batch_stats"])
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(teacher["params"]), jax.tree.leaves(before["params"]["net"]), strict=True))
  assert aux["kd_loss"] > 0 and aux["feature_distill_loss"] > 0
  np.testing.assert_allclose(aux["loss"], aux["kd_loss"] + 10 * aux["feature_distill_loss"],
                             rtol=1e-5)
