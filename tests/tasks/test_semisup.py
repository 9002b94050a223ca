"""Semi-supervised task.

* Each method's unlabeled term equals its primitive in ``bigvl.losses.consistency`` applied to
  the right views (weak for the target, strong for the prediction), recomputed here from a
  direct call of the model; confidence thresholds are 0 so the masked branch is live; the
  weight is the ramp-up at the step and really multiplies the term.
* The host makes each method's views in the papers' order.
* Every method takes a sharded step on 8 devices; FixMatch's equals the 1-device step.
* A method unit added to the registry runs through the task untouched.
* Prediction functions and eval data of the declared task interface; Mean Teacher's teacher
  survives checkpoint/resume and has its own evaluator; the labeled / unlabeled / test split.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import checkpoint, parallel, train
from bigvl.config import ConfigError, load_sibling
from bigvl.data import augment, digits
from bigvl.losses import consistency as C
from bigvl.tasks import semisup_methods
from tests.helpers import REPO

MEAN, STD = 0.3, 0.4  # the tiny config's normalisation (0..1 pixel units)
B = 8  # labeled batch; mu = 1


def tiny_ssl_config(method, perturb="weak", **overrides):
  """``configs/semisup_mnist.py:<method>,tiny,perturb=<perturb>`` shrunk to seconds: 8x8
  digits, batch 8, a 2-stage width-4 SmallCNN, mu 1. ``weak`` (default): no input noise or
  dropout, so the references below see the inputs the task normalises."""
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist").get_config(
      f"{method},tiny,perturb={perturb}")
  c.input.dataset = "embedded:digits8x8"
  c.input.mean, c.input.std = (MEAN,), (STD,)
  c.input.batch_size = B
  c.input.num_labels = 50
  c.model.width, c.model.stages = 4, 2
  c.total_steps, c.log_every, c.ckpt_every = 4, 1, 2
  for ev in c.evals.values():
    ev.batch_size, ev.every = 96, 4
  if "mu" in c.semisup:
    c.semisup.mu = 1
  if "num_augs" in c.semisup:
    c.semisup.num_augs = 2
  if "rampup_steps" in c.semisup:
    c.semisup.rampup_steps = 2
  c.update_from_flattened_dict(overrides)
  return c


# --- independent references ---------------------------------------------------------------
def _normalise(images):
  return (np.asarray(images, np.float32) / 255.0 - MEAN) / STD


def _train_mode_logits(task, params, batch_stats, *images):
  """One train-mode forward (BN over the whole concatenation) of the model, called directly,
  split back per input."""
  x = np.concatenate([_normalise(im) for im in images])
  logits, _ = task.model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                               mutable=["batch_stats"])
  return np.split(np.asarray(logits), np.cumsum([len(im) for im in images])[:-1])


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_ce(logits, labels):
  logp = np.log(_np_softmax(logits))
  return float(-np.mean(logp[np.arange(len(labels)), labels]))


def _np_mse(p, q):
  return float(np.mean(np.mean(np.square(p - q), -1)))


class _Setup:
  """The task (1 device), one host batch from its train stream, its (unboxed) init with the
  classifier's kernel scaled by ``head_scale`` (confident, far-apart predictions) and its
  jitted loss."""

  def __init__(self, method, head_scale=1.0, perturb="weak", **overrides):
    self.task = train.build(tiny_ssl_config(method, perturb, **overrides),
                            devices=jax.devices()[:1]).task
    self.batch = next(self.task.train_data(0))
    self.params, self.state = parallel.unbox(self.task.init(jax.random.PRNGKey(0), self.batch))
    head = {**self.params["head"], "kernel": head_scale * self.params["head"]["kernel"]}
    self.params = {**self.params, "head": head}
    self._loss = jax.jit(self.task.loss)
    u = self.batch["unlabeled"]["image"] if "unlabeled" in self.batch else np.zeros((0, 0))
    #: labeled images, then each unlabeled view
    self.images = [self.batch["labeled"]["image"]] + [u[:, v] for v in range(u.shape[1])]

  def loss(self, state=None, step=0):
    """``(loss, metrics, new_state)`` of the task's loss on the batch at ``step``."""
    state = self.state if state is None else state
    loss, (metrics, new_state) = self._loss(self.params, state, self.batch,
                                            jax.random.PRNGKey(1), jnp.int32(step))
    return float(loss), {k: float(v) for k, v in metrics.items()}, jax.device_get(new_state)

  def logits(self, *images, variables=None):
    """Reference: the model called directly in train mode on ``images`` concatenated."""
    v = variables or {"params": self.params, "batch_stats": self.state["batch_stats"]}
    return _train_mode_logits(self.task, v["params"], v["batch_stats"], *images)


# --- the unlabeled terms ------------------------------------------------------------------
T_UDA = 0.5
#: method -> its primitive of (logits of the weak view: the target, logits of the strong view:
#: the prediction), threshold 0.
PAIRED = {
    "fixmatch": lambda w, s: C.fixmatch_loss(w, s, 0.0),
    "uda": lambda w, s: C.uda_loss(w, s, T_UDA, 0.0),
}


@pytest.mark.parametrize("method", sorted(PAIRED))
def test_weak_view_is_the_target_strong_view_the_prediction(method):
  primitive = PAIRED[method]
  extra = {"semisup.temperature": T_UDA} if method == "uda" else {}
  s = _Setup(method, head_scale=10.0, **{"semisup.threshold": 0.0, "semisup.lambda_u": 2.5},
             **extra)
  loss, m, _ = s.loss()
  # Slot 0 is the weak view, slot 1 the strong one (test_views_are_made_in_the_papers_order).
  lab, weak, strong = s.logits(*s.images)
  want = float(primitive(weak, strong))
  assert m["mask"] == 1.0  # threshold 0: every unlabeled example contributes
  np.testing.assert_allclose(m["unsup_loss"], want, rtol=1e-5)
  # The check tells the views apart: the swapped assignment is far from it.
  assert abs(float(primitive(strong, weak)) - want) > 0.05 * want
  sup = _np_ce(lab, s.batch["labeled"]["label"])
  np.testing.assert_allclose(m["sup_loss"], sup, rtol=1e-5)
  # Weighted: L = CE + 2.5 L_u, and L_u is large enough that a zeroed weight shows.
  assert m["w_u"] == 2.5 and want > 0.05
  np.testing.assert_allclose(loss, sup + 2.5 * want, rtol=1e-5)


def _np_entropy(logits):
  p = _np_softmax(logits)
  return float(np.mean(-np.sum(p * np.log(p), -1)))


#: method -> (config overrides, number of unlabeled views in the shared forward, reference
#: L_u of their logits).
SINGLE_MODEL = {
    "pseudo_label": ({"semisup.threshold": 0.0, "semisup.rampup_steps": 0}, 1,
                     lambda u: float(C.pseudo_label_loss(u, 0.0))),
    "entropy_min": ({}, 1, _np_entropy),
    "pi_model": ({}, 2, lambda u1, u2: _np_mse(_np_softmax(u1), _np_softmax(u2))),
}


@pytest.mark.parametrize("method", sorted(SINGLE_MODEL))
def test_single_model_terms_match_their_primitive(method):
  overrides, n_views, reference = SINGLE_MODEL[method]
  s = _Setup(method, head_scale=10.0, **overrides)
  loss, m, _ = s.loss()
  _, *logits_u = s.logits(*s.images[:1 + n_views])
  want = reference(*logits_u)
  assert want > 1e-3
  np.testing.assert_allclose(m["unsup_loss"], want, rtol=1e-4)
  if "mask" in m:
    assert m["mask"] == 1.0
  assert m["w_u"] > 0.5  # weighted in (Pi: 100 exp(-5) at step 0 of its ramp-up)
  np.testing.assert_allclose(loss, m["sup_loss"] + m["w_u"] * want, rtol=1e-5)


def test_mean_teacher_term_student_on_view_1_teacher_on_view_2():
  s = _Setup("mean_teacher", head_scale=10.0)
  # A teacher that differs from the student (at init they are equal).
  teacher = {"params": jax.tree.map(lambda p: 0.7 * p, s.params),
             "batch_stats": s.state["batch_stats"]}
  state = {**s.state, "teacher": teacher}
  _, m, new_state = s.loss(state)
  xl, u1, u2 = s.images
  _, student = s.logits(xl, u1)
  (t2,) = s.logits(u2, variables=teacher)  # train mode, BN over the teacher's batch alone
  want = _np_mse(_np_softmax(student), _np_softmax(t2))
  np.testing.assert_allclose(m["unsup_loss"], want, rtol=1e-4)
  (t1,) = s.logits(u1, variables=teacher)
  _, s2 = s.logits(xl, u2)
  assert abs(_np_mse(_np_softmax(s2), _np_softmax(t1)) - want) > 1e-2 * want
  assert m["teacher_u_acc"] == np.mean(np.argmax(t2, -1) == s.batch["unlabeled"]["label"])
  # loss leaves the teacher alone (after_step moves it).
  jax.tree.map(np.testing.assert_array_equal, new_state["teacher"], teacher)


def test_temporal_ensembling_target_and_accumulator():
  s = _Setup("temporal_ensembling", **{"semisup.ensemble_momentum": 0.6})
  alpha, n_u = 0.6, len(s.task.unlabeled)
  idx = s.batch["unlabeled"]["index"]
  rng = np.random.default_rng(0)
  # Half the batch seen before (1 or 3 times) with a known accumulator, half never.
  counts = np.zeros(n_u, np.int32)
  counts[idx[: B // 2]] = rng.choice([1, 3], B // 2)
  ens = rng.dirichlet(np.ones(10), n_u).astype(np.float32) * (1 - alpha ** counts)[:, None]
  state = {**s.state, "ensemble": jnp.asarray(ens), "ensemble_count": jnp.asarray(counts)}
  _, m, new_state = s.loss(state)
  _, lu = s.logits(*s.images)
  z = _np_softmax(lu)
  seen = counts[idx] > 0
  target = ens[idx] / np.where(seen, 1 - alpha ** counts[idx], 1.0)[:, None]
  want = float(np.mean(seen * np.mean(np.square(z - target), -1)))
  np.testing.assert_allclose(m["unsup_loss"], want, rtol=1e-4)
  assert m["mask"] == 0.5
  np.testing.assert_allclose(new_state["ensemble"][idx], alpha * ens[idx] + (1 - alpha) * z,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new_state["ensemble_count"][idx], counts[idx] + 1)
  others = np.setdiff1d(np.arange(n_u), idx)
  np.testing.assert_array_equal(new_state["ensemble"][others], ens[others])
  np.testing.assert_array_equal(new_state["ensemble_count"][others], counts[others])


def _sigmoid_ramp(t, length):
  return np.exp(-5.0 * (1.0 - min(t / length, 1.0)) ** 2)


def _linear_ramp(t, length):
  return min(t / length, 1.0)


@pytest.mark.parametrize("method, ramp", [
    ("pi_model", _sigmoid_ramp), ("temporal_ensembling", _sigmoid_ramp),
    ("mean_teacher", _sigmoid_ramp), ("mixmatch", _linear_ramp), ("pseudo_label", _linear_ramp),
    ("vat", None), ("entropy_min", None), ("uda", None), ("fixmatch", None)])
def test_weight_is_the_ramp_at_the_step(method, ramp):
  ramped = {"semisup.rampup_steps": 10} if ramp else {}
  s = _Setup(method, **{"semisup.lambda_u": 3.0}, **ramped)
  for step in (0, 4, 20):
    loss, m, _ = s.loss(step=step)
    want = 3.0 * (ramp(step, 10) if ramp else 1.0)
    np.testing.assert_allclose(m["w_u"], want, rtol=1e-6)
    np.testing.assert_allclose(loss, m["sup_loss"] + want * m["unsup_loss"], rtol=1e-5)


def test_mean_teacher_after_step_is_the_ema():
  s = _Setup("mean_teacher", **{"semisup.rampup_steps": 5, "semisup.ema_decay_rampup": 0.9,
                                "semisup.ema_decay": 0.999})
  student = jax.tree.map(lambda p: p + 1.0, s.params)
  # d = 0.9 while step < 5, 0.999 after, but never above 1 - 1/(step + 2).
  for step, decay in ((0, 0.5), (3, 0.8), (4, 5 / 6), (5, 6 / 7), (500, 501 / 502),
                      (5000, 0.999)):
    new = s.task.after_step(student, s.state, jnp.int32(step))
    jax.tree.map(lambda t, t_new, x, d=decay: np.testing.assert_allclose(
        t_new, d * t + (1 - d) * x, rtol=1e-5, atol=1e-6),
        s.state["teacher"]["params"], new["teacher"]["params"], student)
    jax.tree.map(np.testing.assert_array_equal, new["batch_stats"], s.state["batch_stats"])


# --- the views the host makes -------------------------------------------------------------
@pytest.mark.parametrize("method, kinds", [
    ("fixmatch", ("weak", "strong")), ("uda", ("weak", "strong")),
    ("mean_teacher", ("weak", "weak")), ("pi_model", ("weak", "weak")),
    ("mixmatch", ("weak", "weak")), ("temporal_ensembling", ("weak",)), ("vat", ("weak",)),
    ("pseudo_label", ("weak",)), ("entropy_min", ("weak",))])
def test_views_are_made_in_the_papers_order(method, kinds):
  c = tiny_ssl_config(method)
  c.input.strong_num_ops = 3
  task = train.build(c, devices=jax.devices()[:1]).task
  ex = task.unlabeled[3]

  def views(order, seed=7):
    rng = np.random.default_rng(seed)
    make = {"weak": lambda im: augment.weak_augment(im, rng, flip=c.input.flip,
                                                   max_translate=c.input.max_translate),
            "strong": lambda im: augment.strong_augment(
                im, rng, flip=c.input.flip, max_translate=c.input.max_translate,
                num_ops=3, ops=c.input.strong_ops)}
    return np.stack([make[k](ex["image"]) for k in order])

  got = task.unlabeled_transform(ex, np.random.default_rng(7))["image"]
  np.testing.assert_array_equal(got, views(kinds))
  if len(set(kinds)) > 1:
    assert not np.array_equal(got, views(kinds[::-1]))


@pytest.mark.parametrize("method, overrides, want", [
    ("supervised", {}, B), ("fixmatch", {}, B + B * 2), ("uda", {"semisup.mu": 2}, B + 16 * 2),
    ("mean_teacher", {}, B + B * 2), ("temporal_ensembling", {}, B + B),
    ("mixmatch", {"semisup.num_augs": 3}, B + B * 3)])
def test_examples_per_step_counts_every_view(method, overrides, want):
  task = train.build(tiny_ssl_config(method, **overrides), devices=jax.devices()[:1]).task
  assert task.examples_per_step == want


# --- sharded steps --------------------------------------------------------------------------
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


@pytest.mark.parametrize("method", list(semisup_methods.METHODS))
def test_each_method_takes_a_sharded_step(method):
  assert jax.device_count() == 8
  # perturb=auto: the Pi-model, TE and Mean Teacher with their papers' input noise.
  run, before, after, aux = _one_step(tiny_ssl_config(method, perturb="auto"))
  assert dict(run.mesh.shape)["data"] == 8
  assert np.isfinite(aux["loss"]) and aux["skipped_steps"] == 0, aux
  assert int(after["step"]) == 1
  assert _changed(before["params"], after["params"])
  assert _changed(before["extra"]["batch_stats"], after["extra"]["batch_stats"])
  if method != "supervised":
    assert np.isfinite(aux["unsup_loss"])
    np.testing.assert_allclose(aux["loss"], aux["sup_loss"] + aux["w_u"] * aux["unsup_loss"],
                               rtol=1e-5)
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
    assert seen.sum() == B and np.allclose(extra["ensemble"][seen].sum(-1), 0.4, atol=1e-5)


def test_fixmatch_sharded_step_equals_single_device():
  cfg = {"optim.name": "sgd", "optim.lr": 0.5, "optim.wd": 0.0, "semisup.threshold": 0.0}
  _, b1, a1, x1 = _one_step(tiny_ssl_config("fixmatch", **cfg), jax.devices()[:1])
  _, b8, a8, x8 = _one_step(tiny_ssl_config("fixmatch", **cfg))
  jax.tree.map(np.testing.assert_array_equal, b1["params"], b8["params"])
  # The unlabeled branch is live (every example over the threshold) and matches.
  assert x1["mask"] == x8["mask"] == 1.0 and x1["unsup_loss"] > 0.05
  for key in ("loss", "sup_loss", "unsup_loss"):
    np.testing.assert_allclose(x8[key], x1[key], rtol=1e-5)
  # BN statistics are over the global batch, so the sharded update equals the unsharded one.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               a1["extra"]["batch_stats"], a8["extra"]["batch_stats"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               a1["params"], a8["params"])


# --- a new method is one unit ---------------------------------------------------------------
def _probe_unsup(ctx, inp, fwd):
  """Test-only: ``lambda_u * mean H(p(strong view))``; counts the unlabeled images it saw."""
  return (jnp.mean(C.entropy(fwd.logits_u[0])), semisup_methods.weight(ctx.hp, inp.step),
          {"probe": jnp.float32(1.0)},
          {**inp.state, "seen": inp.state["seen"] + inp.views[0].shape[0]})


PROBE = semisup_methods.Method(
    defaults={"mu": 1, "lambda_u": 0.5}, views=semisup_methods.fixed_views("strong"),
    unsup=_probe_unsup,
    init=lambda ctx, params, state: {**state, "seen": jnp.zeros((), jnp.int32),
                                     "after": jnp.zeros((), jnp.int32)},
    after_step=lambda ctx, params, state, step: {**state, "after": state["after"] + 1},
    predictors={"zero_logits": lambda params, state: jax.tree.map(
        jnp.zeros_like, {"params": params, "batch_stats": state["batch_stats"]})})


def test_a_registered_unit_runs_through_the_task(monkeypatch):
  monkeypatch.setitem(semisup_methods.METHODS, "probe", PROBE)
  c = tiny_ssl_config("probe")  # the config and the task find it in the registry
  assert c.method == "probe" and c.semisup.to_dict() == {"mu": 1, "lambda_u": 0.5}
  run, before, after, aux = _one_step(c)
  task = run.task
  assert task.views == ("strong",) and task.examples_per_step == 2 * B
  assert int(after["extra"]["seen"]) == B and int(after["extra"]["after"]) == 1
  assert aux["probe"] == 1.0 and aux["w_u"] == 0.5
  assert set(task.predict_fns()) == {"logits", "zero_logits"}
  # Its term, recomputed from the model on the batch's (strong) view.
  s = _Setup("probe")
  _, m, _ = s.loss()
  _, lu = s.logits(*s.images)
  np.testing.assert_allclose(m["unsup_loss"], _np_entropy(lu), rtol=1e-4)
  zero = s.task.predict_fns()["zero_logits"](s.params, s.state, {"image": s.images[0]})
  np.testing.assert_array_equal(zero, 0.0)  # its own predictor: an all-zero model
  # Its knobs are checked like the built-in methods'.
  bad = tiny_ssl_config("probe")
  bad.semisup.threshold = 0.5
  with pytest.raises(ConfigError, match=r"threshold.*'probe'.*mu, lambda_u"):
    train.build(bad)
  # A unit with views but no unlabeled batch size is refused by name.
  monkeypatch.setitem(semisup_methods.METHODS, "probe", PROBE._replace(defaults={"lambda_u": 1.0}))
  with pytest.raises(ConfigError, match=r"'probe'.*'mu'"):
    train.build(tiny_ssl_config("probe"))


# --- evaluation interface -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fixmatch", "mean_teacher"])
def test_predict_fns_are_eval_mode_logits(method):
  s = _Setup(method)
  params, rng = s.params, np.random.default_rng(0)
  # Non-trivial running statistics, and (Mean Teacher) a teacher unlike the student.
  student = {"params": params, "batch_stats": jax.tree.map(
      lambda x: x + rng.uniform(0.1, 0.5, x.shape).astype(np.float32), s.state["batch_stats"])}
  state = {**s.state, "batch_stats": student["batch_stats"]}
  want_vars = {"logits": student}
  if method == "mean_teacher":
    state["teacher"] = want_vars["teacher_logits"] = {
        "params": jax.tree.map(lambda p: 0.5 * p, params), "batch_stats": student["batch_stats"]}
  fns = s.task.predict_fns()
  assert set(fns) == set(want_vars)
  images = s.images[0]
  got = {name: np.asarray(jax.jit(fn)(params, state, {"image": images}))
         for name, fn in fns.items()}
  for name, variables in want_vars.items():
    want = s.task.model.apply(variables, _normalise(images), train=False)
    np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-5)
  if method == "mean_teacher":
    assert not np.allclose(got["logits"], got["teacher_logits"], atol=1e-3)


def test_eval_transform_image_label():
  task = train.build(tiny_ssl_config("fixmatch"), devices=jax.devices()[:1]).task
  assert task.eval_kinds == ("image_label",)
  ex = digits.load_split("digits8x8", "test")[5]
  row = task.eval_transform("image_label")(ex)
  assert set(row) == {"image", "label"}
  assert row["image"].dtype == np.uint8 and row["label"].dtype == np.int32
  np.testing.assert_array_equal(row["image"], ex["image"])
  assert row["label"] == ex["label"]
  with pytest.raises(ConfigError, match="image_text"):
    task.eval_transform("image_text")


# --- checkpoints, data ----------------------------------------------------------------------
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
  assert {"test/accuracy", "test/error", "teacher/accuracy", "teacher/error"} <= set(first)
  assert 0 <= first["teacher/error"] <= 1

  second = train.train(tiny_ssl_config("mean_teacher", total_steps=6), workdir)
  assert restored["step"] == 4 and sorted(saved) == [2, 4, 6]
  teacher = restored["state"]["extra"]["teacher"]
  jax.tree.map(np.testing.assert_array_equal, teacher, saved[4]["teacher"])
  assert _changed(teacher["params"], restored["state"]["params"])  # teacher != student
  assert _changed(saved[6]["teacher"], saved[4]["teacher"])  # and it kept training
  assert "teacher/error" in second


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
  with pytest.raises(ConfigError, match="ema_decay.*fixmatch.*mu, lambda_u, threshold"):
    train.build(c)
  c = tiny_ssl_config("fixmatch")
  c.method = "no_such_method"
  with pytest.raises(ConfigError, match="no_such_method"):
    train.build(c)
  with pytest.raises(ConfigError, match="num_labels"):
    train.build(tiny_ssl_config("fixmatch", **{"input.num_labels": 15}))
  with pytest.raises(ConfigError, match="threshold must be in"):
    train.build(tiny_ssl_config("fixmatch", **{"semisup.threshold": 1.5}))
  cfg = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist")
  assert cfg.get_config("method=vat,tiny").method == "vat"
  assert cfg.get_config("mixmatch").model.name == "wide_resnet"
  assert set(cfg.get_config("mean_teacher,tiny").evals) == {"test", "teacher"}
  assert cfg.get_config("mean_teacher,tiny").evals.teacher.predict_fn == "teacher_logits"
  assert set(cfg.get_config("fixmatch,tiny").evals) == {"test"}
  base = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_base")
  with pytest.raises(ConfigError, match="not an experiment"):
    base.get_config("tiny")


def test_input_noise_is_gaussian_per_view_and_absent_by_default():
  """``input.noise_std = s``: the model sees ``normalised + s N(0, 1)``, a fresh draw for the
  labeled batch and each view (recorded from the forward's input); ``s = 0``: exactly the
  normalised images."""
  s = 0.5
  seen = []
  for std in (0.0, s):
    setup = _Setup("pi_model", perturb="paper", **{"input.noise_std": std})
    apply = setup.task._apply
    setup.task._apply = lambda p, b, x, r, u=True, apply=apply: (seen.append(x), apply(
        p, b, x, r, u))[1]
    setup.task.ctx = setup.task.ctx._replace(apply=setup.task._apply)
    with jax.disable_jit():  # the recorded inputs are concrete
      setup.task.loss(setup.params, setup.state, setup.batch, jax.random.PRNGKey(1),
                      jnp.int32(0))
    clean = np.concatenate([_normalise(im) for im in setup.images])
    got = np.asarray(seen.pop())
    if std == 0.0:
      np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-6)
      continue
    noise = (got - clean).reshape(len(setup.images), -1)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - s) < 0.05
    # independent draws per input: views' noises are uncorrelated
    corr = np.corrcoef(noise)
    assert np.abs(corr[np.triu_indices(len(noise), 1)]).max() < 0.2


def test_papers_perturbations_config_arg():
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist")
  for arg, want in (("mean_teacher,tiny", 0.15), ("supervised,tiny", None),
                    ("supervised,tiny,perturb=paper", 0.15),
                    ("temporal_ensembling,tiny,perturb=weak", None)):
    cfg = c.get_config(arg)
    assert cfg.input.get("noise_std") == want, arg
    assert cfg.model.get("stage_dropout") == (0.5 if want else None), arg
  with pytest.raises(ConfigError, match="perturb"):
    c.get_config("supervised,tiny,perturb=strong")
  full = c.get_config("mean_teacher")  # WRN-28-2: translations and noise, no stage dropout
  assert full.input.noise_std == 0.15 and full.input.max_translate == 2 / 28
  assert "stage_dropout" not in full.model
  cifar = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_cifar10")
  with pytest.raises(ConfigError, match="perturb"):
    cifar.get_config("mean_teacher,perturb=paper")
