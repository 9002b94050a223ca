"""FFF in the two-tower task: the ring loss equals the dense loss on 8 devices (K captions,
mining on), mining counts planted duplicates, a teacher checkpoint is restored, bad knobs fail."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import checkpoint, parallel, train
from bigvl.config import ConfigError
from bigvl.losses import contrastive
from bigvl.tasks.two_tower import owner_ids
from tests.helpers import tiny_config

# SGD: see tests/test_parallel.py (Adam's first step amplifies rounding noise).
SGD = {"optim.name": "sgd", "optim.lr": 0.5, "optim.b2": None, "schedule.warmup_steps": 0}
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
  params, state = parallel.unbox(run.task.init(jax.random.PRNGKey(seed), batch))
  params, state = jax.device_put((params, state), parallel.replicated(run.mesh))
  state = train.load_pretrained({"params": params, "extra": state}, run.weights)["extra"]
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
  run, params, state, _ = _setup(c)
  batch = _planted_batch(run)
  zimg = np.asarray(run.task.predict_fns()["embed_images"](params, state, batch))
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
  own = contrastive.positives_from_owners(jnp.arange(16), owner_ids(16, 2))  # image j // 2
  want = contrastive.sigmoid_loss(zimg, ztxt, t, b, positives=own)
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
  """``compile_run``'s init (jit, then the declared pretrained weights): the teacher is the
  checkpoint's params, laid out as their logical axes say (fsdp over 2 devices), not
  replicated constants."""
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
  teacher, _ = parallel.unbox(run.task.init(jax.random.PRNGKey(0), _first_batch(run)))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "t"))
  ckpt.save(1, {"params": teacher}, {})
  ckpt.close()
  c = _config(shapes_data_dir, **{**MINE, "loss.mining.source": "teacher",
                                   "loss.mining.teacher_ckpt": str(tmp_path / "t"),
                                   "model.embed_dim": 16})
  run = train.build(c)
  batch = _first_batch(run)
  fns = train.compile_run(run, batch)  # traces only: shapes are checked before compiling init
  with pytest.raises(ConfigError, match=r"teacher_ckpt: 'params/img_proj/bias' is \(32,\)"
                     r".* but extra/teacher/img_proj/bias is \(16,\) in this model"):
    fns.init(batch)


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


def _np_weighted_sigmoid_loss(zimg, ztxt, t, b, positives, weights):
  """``-1/N sum_ij c_ij log sigmoid(z_ij (t <x_i, y_j> + b))`` in float64, ``c_ij = weights_i``
  on positive pairs and 1 on negatives."""
  zimg, ztxt = (np.asarray(a, np.float64) for a in (zimg, ztxt))
  logits = t * zimg @ ztxt.T + b
  z = 2.0 * positives - 1.0
  c = np.where(positives > 0, np.asarray(weights, np.float64)[:, None], 1.0)
  return float(np.sum(c * np.logaddexp(0.0, -z * logits)) / len(zimg))


@pytest.mark.parametrize("impl", ["dense", "ring"])
def test_normalize_weighs_positives_k_over_k_plus_mined(shapes_data_dir, impl):
  """``loss.mining.normalize``: image i's positives weigh K / (K + mined_i). Mining only the
  two planted duplicate pairs (thr_ii), images 0, 1, 3, 5 each gain the other's K = 2
  captions, weight 2 / 4; the other 12 images keep weight 1. The task's loss is the float64
  reference with exactly these weights (and with weight 1 everywhere without normalize)."""
  n, k = 16, 2
  mine = {"loss.impl": impl, "loss.mining.source": "self", "loss.mining.thr_ii": 1 - 1e-5,
          "loss.mining.thr_tt": None, "loss.mining.thr_it": None, **MESH}
  c = _config(shapes_data_dir, **mine)
  run, params, state, _ = _setup(c)
  batch = _planted_batch(run)
  fns = run.task.predict_fns()
  zimg = fns["embed_images"](params, state, {"image": batch["image"]})
  ztxt = fns["embed_texts"](params, state, {"tokens": batch["tokens"].reshape(n * k, -1)})
  t, b = float(np.exp(params["t_prime"])), float(params["b"])
  positives = np.kron(np.eye(n), np.ones((1, k)))  # image i owns texts i K .. i K + K - 1
  for a, d in ((1, 0), (5, 3)):
    positives[a, d * k:(d + 1) * k] = positives[d, a * k:(a + 1) * k] = 1.0
  mined = np.isin(np.arange(n), (0, 1, 3, 5)) * k
  [(plain, aux)] = _forward(c, batch)
  [(norm, aux_n)] = _forward(_config(shapes_data_dir, **mine, **NORM), batch)
  assert aux["mined_positives"] == aux_n["mined_positives"] == mined.sum() == 8
  np.testing.assert_allclose(
      plain, _np_weighted_sigmoid_loss(zimg, ztxt, t, b, positives, np.ones(n)), rtol=1e-5)
  np.testing.assert_allclose(
      norm, _np_weighted_sigmoid_loss(zimg, ztxt, t, b, positives, k / (k + mined)), rtol=1e-5)
  assert plain - norm > 1e-3  # the weights matter at this tolerance


def test_a_new_loss_variant_is_one_unit(shapes_data_dir, monkeypatch):
  """A variant registered in ``two_tower.LOSSES`` runs (and is validated) without editing the
  task: here the dense sigmoid loss with every pair weighted 2 gives twice its loss."""
  from bigvl.tasks import two_tower

  def doubled(task, zimg, ztxt, t, b, owners, mined, k):
    loss, b, metrics = two_tower._sigmoid_dense(task, zimg, ztxt, t, b, owners, mined, k)
    return 2 * loss, b, {**metrics, "doubled": jnp.ones(())}

  monkeypatch.setitem(two_tower.LOSSES, ("sigmoid", "doubled"),
                      two_tower.LossVariant(doubled, multi_positive=True))
  [(base_loss, _)] = _forward(_config(shapes_data_dir))
  [(loss, aux)] = _forward(_config(shapes_data_dir, **{"loss.impl": "doubled"}))
  np.testing.assert_allclose(loss, 2 * base_loss, rtol=1e-6)
  assert aux["doubled"] == 1
  with pytest.raises(ConfigError, match="max_per_image .* sigmoid/doubled takes the mask"):
    train.build(_config(shapes_data_dir, **{"loss.impl": "doubled", **MINE,
                                            "loss.mining.max_per_image": 2}))


@pytest.mark.parametrize("impl", ["dense", "ring"])
def test_oracle_mining_marks_exactly_the_same_group_pairs(shapes_data_dir, impl):
  """``loss.mining.source='groups'`` with ``input.group_key``: the batch carries each example's
  group; the mined pairs are exactly the other images of the same group (each with its K
  captions), precision and recall against the truth are 1, and the dense loss equals the
  sigmoid loss with ``P = base or same group``. Here the group is ``label`` (the largest
  object), so a batch of 16 has several same-group pairs."""
  c = _config(shapes_data_dir, **MESH, **{"loss.impl": impl, "input.group_key": "label"})
  c.loss.mining = {"source": "groups"}
  run, params, state, batch = _setup(c)
  g = np.asarray(parallel.to_host(batch["group"]))
  same = (g[:, None] == g[None, :]) & ~np.eye(16, dtype=bool)
  assert same.sum() > 0
  [(loss, aux)] = _forward(c, batch)
  assert aux["mined_positives"] == 2 * same.sum()  # K = 2 captions per mined image
  assert aux["true_extra_per_image"] == pytest.approx(2 * same.sum() / 16)
  assert aux["mined_precision"] == 1.0 and aux["mined_recall"] == 1.0
  if impl == "dense":
    tokens = batch["tokens"].reshape(32, -1)
    zimg, ztxt, t, b = run.task.model.apply({"params": params}, batch["image"], tokens)
    positives = np.repeat(same | np.eye(16, dtype=bool), 2, axis=1).astype(np.float32)
    want = contrastive.sigmoid_loss(zimg, ztxt, t, b, positives=jnp.asarray(positives))
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_groups_mining_needs_a_group_key(shapes_data_dir):
  c = _config(shapes_data_dir)
  c.loss.mining = {"source": "groups"}
  with pytest.raises(ConfigError, match="group_key"):
    train.build(c)


def test_mining_knobs_are_idle_when_mining_is_off(shapes_data_dir):
  """A config that keeps ring-only knobs (the full-size FFF config's ``max_per_image``) builds
  with the dense softmax loss once mining is off: they matter only with mining on."""
  c = _config(shapes_data_dir)
  c.loss.mining.update({"source": "none", "max_per_image": 4})
  c.update_from_flattened_dict({"loss.name": "softmax", "input.captions_per_image": 1})
  run = train.build(c)
  assert run.task.mining == "none" and run.task.max_per_image == 4
