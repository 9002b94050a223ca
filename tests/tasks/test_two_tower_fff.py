"""FFF in the two-tower task: the ring loss equals the dense loss on 8 devices (K captions,
mining on), mining counts planted duplicates, a teacher checkpoint is restored, bad knobs fail."""

import jax
import numpy as np
import pytest

from bigvl import checkpoint, parallel, train
from bigvl.config import ConfigError
from tests.helpers import tiny_config

# SGD: see tests/test_parallel.py (Adam's first step amplifies rounding noise).
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "schedule.warmup_steps": 0}
# Low thresholds so that mining fires on a freshly initialised model (whose embeddings are
# all alike): the point here is that both impls use the same mined mask.
MINE = {"loss.mining.source": "self", "loss.mining.thr_ii": 0.9, "loss.mining.thr_tt": 0.9,
        "loss.mining.thr_it": 0.1}


def _config(data_dir, **overrides):
  c = tiny_config(data_dir, **{"input.captions_per_image": 2, **SGD})
  c.evals = {}
  c.loss.impl = "dense"
  c.loss.mining = {"source": "none"}
  c.update_from_flattened_dict(overrides)
  return c


def _first_batch(run):
  return parallel.global_batch(next(run.task.train_data(run.seed)), run.mesh)


def _one_step(config, batch=None):
  run = train.build(config)
  batch = _first_batch(run) if batch is None else batch
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  new, aux = fns.step(state, batch)
  return run, parallel.to_host(new["params"]), jax.device_get(aux)


def _assert_same_step(dense, ring):
  (_, p_dense, a_dense), (_, p_ring, a_ring) = dense, ring
  for key in ("loss", "grad_norm", "pos_logit", "neg_logit"):
    np.testing.assert_allclose(a_ring[key], a_dense[key], rtol=1e-5, err_msg=key)
  flat = dict(jax.tree_util.tree_leaves_with_path(p_dense))
  for path, leaf in jax.tree_util.tree_leaves_with_path(p_ring):
    np.testing.assert_allclose(leaf, flat[path], rtol=1e-5, atol=1e-6,
                               err_msg=parallel.path_str(path))


@pytest.mark.parametrize("mine", [{}, MINE, {**MINE, "loss.mining.max_per_image": 32}],
                         ids=["k2", "k2_mined_rows", "k2_mined_ids"])
def test_ring_equals_dense_on_8_devices(shapes_data_dir, mine):
  assert jax.device_count() == 8
  mesh = {"mesh.data": 4, "mesh.fsdp": 2}
  dense_mine = {k: v for k, v in mine.items() if k != "loss.mining.max_per_image"}
  dense = _one_step(_config(shapes_data_dir, **mesh, **dense_mine))
  ring = _one_step(_config(shapes_data_dir, **mesh, **mine, **{"loss.impl": "ring"}))
  _assert_same_step(dense, ring)
  if mine:
    mined = dense[2]["mined_positives"]
    assert mined > 0 and ring[2]["mined_positives"] == mined
    assert dense[2]["mined_per_image"] == pytest.approx(mined / 16)
  if "loss.mining.max_per_image" in mine:
    assert ring[2]["mined_dropped"] == 0


def _planted_batch(run, dup_of=((1, 0), (5, 3))):
  """The first batch with image (and captions) b replaced by a copy of image a."""
  local = next(run.task.train_data(run.seed))
  for b, a in dup_of:
    local["image"][b] = local["image"][a]
    local["tokens"][b] = local["tokens"][a]
  return parallel.global_batch(local, run.mesh)


@pytest.mark.parametrize("impl", ["dense", "ring"])
def test_mining_counts_planted_duplicates(shapes_data_dir, impl):
  # Identical images have cosine 1 up to rounding; distinct images of a fresh model stay below
  # 1 - 1e-5 (checked below), so thr_ii = 1 - 1e-5 mines exactly the planted pairs.
  c = _config(shapes_data_dir, **{"loss.impl": impl, "loss.mining.source": "self",
                                  "loss.mining.thr_ii": 1 - 1e-5, "loss.mining.thr_tt": None,
                                  "loss.mining.thr_it": None})
  run = train.build(c)
  batch = _planted_batch(run)
  params, _ = run.task.init(jax.random.PRNGKey(0), batch)
  zimg = np.asarray(run.task.embed_images(params, batch["image"]))
  cos = zimg @ zimg.T
  off = ~np.eye(16, dtype=bool)
  off[1, 0] = off[0, 1] = off[5, 3] = off[3, 5] = False
  assert cos[off].max() < 1 - 1e-5 and cos[1, 0] > 1 - 1e-6
  _, _, aux = _one_step(c, batch)
  # Two duplicated pairs, each image gaining the other's K = 2 captions: 2 * 2 * 2.
  assert aux["mined_positives"] == 8 and aux["mined_ii"] == 8
  assert aux["mined_tt"] == 0 and aux["mined_it"] == 0
  assert aux["mined_per_image"] == pytest.approx(8 / 16)


def test_mining_off_before_start_step(shapes_data_dir):
  c = _config(shapes_data_dir, **MINE, **{"loss.mining.start_step": 1})
  run, _, aux = _one_step(c)
  assert aux["mined_positives"] == 0
  # Same loss as no mining at all on the first step.
  _, _, plain = _one_step(_config(shapes_data_dir))
  np.testing.assert_allclose(aux["loss"], plain["loss"], rtol=1e-6)


def test_teacher_checkpoint_is_restored_and_frozen(shapes_data_dir, tmp_path):
  c = _config(shapes_data_dir)
  run = train.build(c)
  batch = _first_batch(run)
  teacher, _ = run.task.init(jax.random.PRNGKey(42), batch)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "teacher"))
  ckpt.save(7, {"params": teacher, "step": np.int32(7)}, {})
  ckpt.close()

  tc = _config(shapes_data_dir, **MINE, **{"loss.mining.source": "teacher",
                                           "loss.mining.teacher_ckpt": str(tmp_path / "teacher")})
  run = train.build(tc)
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  got = parallel.to_host(state["extra"]["teacher"])
  jax.tree.map(np.testing.assert_array_equal, got, parallel.to_host(teacher))
  new, aux = fns.step(state, batch)
  assert aux["mined_positives"] > 0
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(new["extra"]["teacher"]), got)


def test_teacher_with_another_model_config_is_a_config_error(shapes_data_dir, tmp_path):
  run = train.build(_config(shapes_data_dir))
  teacher, _ = run.task.init(jax.random.PRNGKey(0), _first_batch(run))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "t"))
  ckpt.save(1, {"params": teacher}, {})
  ckpt.close()
  c = _config(shapes_data_dir, **MINE, **{"loss.mining.source": "teacher",
                                          "loss.mining.teacher_ckpt": str(tmp_path / "t"),
                                          "model.embed_dim": 16})
  with pytest.raises(ConfigError, match="same config.model"):
    train.build(c)


@pytest.mark.parametrize("overrides, needle", [
    ({"loss.impl": "chunked"}, "loss.impl"),
    ({"loss.impl": "ring", "loss.name": "softmax", "input.captions_per_image": 1}, "sigmoid"),
    ({"loss.mining.source": "ema"}, "mining.source"),
    ({"loss.mining.source": "teacher"}, "teacher_ckpt"),
    ({"loss.mining.source": "teacher", "loss.mining.teacher_ckpt": "/nonexistent"},
     "no bigvl checkpoint"),
    ({**MINE, "loss.mining.thr_ii": 1.5}, "thr_ii"),
    ({**MINE, "loss.mining.thr_tt": "high"}, "thr_tt"),
    ({**MINE, "loss.mining.start_step": -1}, "start_step"),
    ({**MINE, "loss.mining.max_per_image": 4}, "max_per_image"),  # dense impl
    ({**MINE, "loss.mining.thr_ii": None, "loss.mining.thr_tt": None,
      "loss.mining.thr_it": None}, "nothing can be mined"),
    ({**MINE, "loss.name": "softmax", "input.captions_per_image": 1}, "sigmoid"),
    ({"loss.mining.thr_typo": 0.5}, "thr_typo"),
])
def test_bad_fff_config_is_a_config_error(shapes_data_dir, overrides, needle):
  c = _config(shapes_data_dir)
  c.loss.mining.update({k.split(".")[-1]: v for k, v in overrides.items()
                        if k.startswith("loss.mining.")})
  c.update_from_flattened_dict({k: v for k, v in overrides.items()
                                if not k.startswith("loss.mining.")})
  with pytest.raises(ConfigError, match=needle):
    train.build(c)
