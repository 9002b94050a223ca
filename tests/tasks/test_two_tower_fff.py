"""FFF in the two-tower task: the ring loss equals the dense loss on 8 devices (K captions,
mining on), mining counts planted duplicates, a teacher checkpoint is restored, bad knobs fail."""

import jax
import numpy as np
import pytest

from bigvl import checkpoint, parallel, train
from bigvl.config import ConfigError
from bigvl.losses import contrastive
from bigvl.tasks.two_tower import owner_positives
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


def _setup(config, batch=None, seed=0):
  """(run, params replicated on the mesh, task state, batch) without compiling a train step."""
  run = train.build(config)
  batch = _first_batch(run) if batch is None else batch
  params, state = run.task.init(jax.random.PRNGKey(seed), batch)
  params, state = jax.device_put((params, state), parallel.replicated(run.mesh))
  state = run.task.load_frozen(state, jax.tree.map(lambda x: x.sharding, state))
  return run, params, state, batch


def _forward(config, batch=None, steps=(0,)):
  """[(loss, metrics)] of the jitted task loss at each of ``steps``."""
  run, params, state, batch = _setup(config, batch)

  def loss_and_metrics(p, s, step):
    loss, (metrics, _) = run.task.loss(p, s, batch, None, step)
    return loss, metrics

  fn = jax.jit(loss_and_metrics)
  return [jax.device_get(fn(params, state, np.int32(step))) for step in steps]


def _value_and_grad(config):
  run, params, state, batch = _setup(config)
  fn = jax.jit(jax.value_and_grad(lambda p: run.task.loss(p, state, batch, None, 0),
                                  has_aux=True))
  (loss, (aux, _)), grads = fn(params)
  return jax.device_get((loss, aux)), parallel.to_host(grads)


MESH = {"mesh.data": 4, "mesh.fsdp": 2}


def test_ring_equals_dense_loss_and_grads_k2_mined(shapes_data_dir):
  assert jax.device_count() == 8
  (l_dense, a_dense), g_dense = _value_and_grad(_config(shapes_data_dir, **MESH, **MINE))
  (l_ring, a_ring), g_ring = _value_and_grad(_config(shapes_data_dir, **MESH, **MINE,
                                                     **{"loss.impl": "ring"}))
  assert a_dense["mined_positives"] > 0
  assert a_ring["mined_positives"] == a_dense["mined_positives"]
  np.testing.assert_allclose(l_ring, l_dense, rtol=1e-5)
  for key in ("pos_logit", "neg_logit"):
    np.testing.assert_allclose(a_ring[key], a_dense[key], rtol=1e-5, err_msg=key)
  flat = dict(jax.tree_util.tree_leaves_with_path(g_dense))
  # float32 sums in another order: absolute errors scale with the largest gradient (some
  # leaves, e.g. attention key biases, are exactly zero in exact arithmetic and ~1e-7 here).
  atol = 1e-6 * max(np.abs(x).max() for x in jax.tree.leaves(g_dense))
  for path, leaf in jax.tree_util.tree_leaves_with_path(g_ring):
    np.testing.assert_allclose(leaf, flat[path], rtol=1e-4, atol=atol,
                               err_msg=parallel.path_str(path))
  # The gradient is not trivially zero.
  assert np.abs(g_dense["img"]["embedding"]["kernel"]).max() > 1e-4


NORM = {"loss.mining.normalize": True}


@pytest.mark.parametrize("mine", [{}, {**MINE, "loss.mining.max_per_image": 32},
                                  {**MINE, **NORM},
                                  {**MINE, **NORM, "loss.mining.max_per_image": 32}],
                         ids=["k2", "k2_mined_ids", "k2_mined_normalized",
                              "k2_mined_ids_normalized"])
def test_ring_equals_dense_loss(shapes_data_dir, mine):
  dense_mine = {k: v for k, v in mine.items() if k != "loss.mining.max_per_image"}
  [(l_dense, a_dense)] = _forward(_config(shapes_data_dir, **MESH, **dense_mine))
  [(l_ring, a_ring)] = _forward(_config(shapes_data_dir, **MESH, **mine,
                                        **{"loss.impl": "ring"}))
  np.testing.assert_allclose(l_ring, l_dense, rtol=1e-5)
  if mine:
    assert a_ring["mined_positives"] == a_dense["mined_positives"] > 0
  if "loss.mining.max_per_image" in mine:
    assert a_ring["mined_dropped"] == 0


def test_normalize_gives_mined_rows_less_weight(shapes_data_dir):
  """``normalize``: positives of image i weigh K / (K + mined_i) <= 1, so with pairs mined the
  loss is strictly below the unweighted one, and equal without mining."""
  [(plain, aux)] = _forward(_config(shapes_data_dir, **MINE))
  [(norm, _)] = _forward(_config(shapes_data_dir, **MINE, **NORM))
  assert aux["mined_positives"] > 0 and norm < plain
  [(before_mining, _)] = _forward(_config(shapes_data_dir, **MINE, **NORM,
                                          **{"loss.mining.start_step": 5}))
  [(k_only, _)] = _forward(_config(shapes_data_dir))
  np.testing.assert_allclose(before_mining, k_only, rtol=1e-6)


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
  run, params, _, _ = _setup(c)
  batch = _planted_batch(run)
  zimg = np.asarray(run.task.embed_images(params, batch["image"]))
  cos = zimg @ zimg.T
  off = ~np.eye(16, dtype=bool)
  off[1, 0] = off[0, 1] = off[5, 3] = off[3, 5] = False
  assert cos[off].max() < 1 - 1e-5 and cos[1, 0] > 1 - 1e-6
  [(_, aux)] = _forward(c, batch)
  # Two duplicated pairs, each image gaining the other's K = 2 captions: 2 * 2 * 2.
  assert aux["mined_positives"] == 8 and aux["mined_ii"] == 8
  assert aux["mined_tt"] == 0 and aux["mined_it"] == 0
  assert aux["mined_per_image"] == pytest.approx(8 / 16)


def test_mining_off_before_start_step(shapes_data_dir):
  c = _config(shapes_data_dir, **MINE, **{"loss.mining.start_step": 1})
  (loss0, aux0), (loss1, aux1) = _forward(c, steps=(0, 1))
  assert aux0["mined_positives"] == 0 and aux1["mined_positives"] > 0
  # Before start_step the loss is plain K-caption SigLIP: K ones per row.
  run, params, _, batch = _setup(c)
  tokens = batch["tokens"].reshape(32, -1)
  zimg, ztxt, t, b = run.task.model.apply({"params": params}, batch["image"], tokens)
  want = contrastive.sigmoid_loss(zimg, ztxt, t, b, positives=owner_positives(16, 2))
  np.testing.assert_allclose(loss0, want, rtol=1e-5)
  assert loss1 != pytest.approx(loss0)


def test_teacher_checkpoint_is_restored(shapes_data_dir, tmp_path):
  run, teacher, _, batch = _setup(_config(shapes_data_dir), seed=42)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "teacher"))
  ckpt.save(7, {"params": teacher, "step": np.int32(7)}, {})
  ckpt.close()

  tc = _config(shapes_data_dir, **{**MINE, "loss.mining.source": "teacher",
                                    "loss.mining.teacher_ckpt": str(tmp_path / "teacher")})
  run, params, state, _ = _setup(tc, batch)
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(state["teacher"]),
               parallel.to_host(teacher))
  [(_, aux)] = _forward(tc, batch)
  assert aux["mined_positives"] > 0


def test_teacher_is_read_into_its_shards_by_the_run_init(shapes_data_dir, tmp_path):
  """``compile_run``'s init (jit, then ``load_frozen``): the teacher is the checkpoint's params,
  laid out as the partition rules say (fsdp over 2 devices), not replicated constants."""
  run, teacher, _, batch = _setup(_config(shapes_data_dir), seed=7)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "teacher"))
  ckpt.save(3, {"params": teacher}, {})
  ckpt.close()
  tc = _config(shapes_data_dir, **{**MINE, **MESH, "loss.mining.source": "teacher",
                                    "loss.mining.teacher_ckpt": str(tmp_path / "teacher")})
  run = train.build(tc)
  batch = _first_batch(run)
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  got, want = state["extra"]["teacher"], fns.state_shardings["extra"]["teacher"]
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(got), parallel.to_host(teacher))
  jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(
      f"{x.sharding} != {s}"), got, want)
  assert any(not s.is_fully_replicated for s in jax.tree.leaves(want))  # the test means something
  # and the student is a fresh init, not the teacher
  student, frozen = (jax.tree.leaves(parallel.to_host(t)) for t in (state["params"], teacher))
  assert not all(np.allclose(a, b) for a, b in zip(student, frozen, strict=True))


def test_teacher_with_another_model_config_is_a_config_error(shapes_data_dir, tmp_path):
  run = train.build(_config(shapes_data_dir))
  teacher, _ = run.task.init(jax.random.PRNGKey(0), _first_batch(run))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "t"))
  ckpt.save(1, {"params": teacher}, {})
  ckpt.close()
  c = _config(shapes_data_dir, **{**MINE, "loss.mining.source": "teacher",
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
    ({**MINE, "loss.mining.thr_ii": -1.5}, "thr_ii"),
    ({**MINE, "loss.mining.thr_tt": "high"}, "thr_tt"),
    ({**MINE, "loss.mining.start_step": -1}, "start_step"),
    ({**MINE, "loss.mining.max_per_image": 4}, "max_per_image"),  # dense impl
    ({**MINE, "loss.mining.thr_ii": None, "loss.mining.thr_tt": None,
      "loss.mining.thr_it": None}, "nothing can be mined"),
    ({**MINE, "loss.mining.thr_ii": 2.0, "loss.mining.thr_tt": None,  # > 1: off, as None
      "loss.mining.thr_it": 1.01}, "nothing can be mined"),
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
