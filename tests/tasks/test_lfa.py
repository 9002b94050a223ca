"""LFA / U-LFA (bigvl.tasks.lfa) and its command (bigvl.lfa) on small synthetic features."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import expm
from scipy.stats import ortho_group

from bigvl import lfa as cli
from bigvl.tasks import lfa

DIM, CLASSES = 32, 10


def synthetic(theta=1.25, noise=1.0, seed=0):
  """Class embeddings = random unit vectors; image features of class c = (t_c + noise) R with
  R = expm(theta A / sqrt(2 D)) a near-identity rotation (zero-shot ~55 %, the oracle R^T 100 %).
  Returns (t, rot, make) with make(per_class, seed) -> (x, y)."""
  rng = np.random.default_rng(seed)
  t = lfa.normalize(rng.normal(size=(CLASSES, DIM)))
  a = rng.normal(size=(DIM, DIM))
  rot = expm(theta * (a - a.T) / np.sqrt(2 * DIM)).astype(np.float32)

  def make(per_class, seed):
    r = np.random.default_rng(seed)
    y = np.repeat(np.arange(CLASSES), per_class)
    x = (t[y] + noise * lfa.normalize(r.normal(size=(len(y), DIM)))) @ rot
    return (x * r.uniform(0.5, 2.0, (len(y), 1))).astype(np.float32), y   # unnormalised

  return t, rot, make


@pytest.fixture(scope="module")
def data():
  t, rot, make = synthetic()
  (xtr, ytr), (xte, yte) = make(8, 1), make(40, 2)
  return dict(t=t, rot=rot, xtr=xtr, ytr=ytr, xte=xte, yte=yte)


def test_procrustes_recovers_a_planted_rotation():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 16))
  r = ortho_group.rvs(16, random_state=3)
  np.testing.assert_allclose(lfa.procrustes(x, x @ r), r, atol=1e-5)
  # Per-sample targets of another dimension: a semi-orthogonal [16, 8] map.
  w = lfa.procrustes(x, rng.normal(size=(200, 8)))
  assert w.shape == (16, 8)
  np.testing.assert_allclose(w.T @ w, np.eye(8), atol=1e-5)


def test_paired_alignment_of_two_models():
  # Model A's features [N, 16] to model B's [N, 8] of the same samples: each sample is its own
  # "class" (class_emb = targets, labels = arange(N)), W is [16, 8].
  rng = np.random.default_rng(0)
  xa = rng.normal(size=(60, 16)).astype(np.float32)
  xb = (xa @ rng.normal(size=(16, 8)) + 0.5 * rng.normal(size=(60, 8))).astype(np.float32)
  ids = np.arange(60)
  w0 = lfa.procrustes(xa, xb)
  w = lfa.refine(w0, xa, ids, xb, lfa.LFAConfig(n_iters=50))
  assert w.shape == (16, 8)
  assert lfa.objective(w, xa, ids, xb) < lfa.objective(w0, xa, ids, xb)
  assert lfa.accuracy(xa, ids, w, xb) >= lfa.accuracy(xa, ids, w0, xb)


def test_blend_goes_from_procrustes_to_identity():
  r = ortho_group.rvs(8, random_state=0).astype(np.float32)
  np.testing.assert_allclose(lfa.blend(r, 0.0), r)
  np.testing.assert_allclose(lfa.blend(r, 1.0), np.eye(8))
  np.testing.assert_allclose(lfa.blend(r, 0.25), 0.75 * r + 0.25 * np.eye(8), rtol=1e-6)


def test_choose_beta_picks_pure_procrustes_for_a_planted_rotation():
  rng = np.random.default_rng(0)
  t = lfa.normalize(rng.normal(size=(CLASSES, DIM)))
  r = ortho_group.rvs(DIM, random_state=1)
  y = np.repeat(np.arange(CLASSES), 8)
  x = (t[y] + 0.05 * rng.normal(size=(len(y), DIM))) @ r
  assert lfa.accuracy(x, y, None, t) < 0.5
  assert lfa.choose_beta(x, y, t, seed=0) == 0.0


def test_optimizer_is_adamw_with_torch_cosine_schedule():
  cfg = lfa.LFAConfig(n_iters=10)
  opt = lfa.make_optimizer(cfg)
  p = jnp.ones(())
  state = opt.init(p)
  for step in range(cfg.n_iters):
    updates, state = opt.update(jnp.zeros(()), state, p)   # zero gradient: only decay is left
    lr = cfg.end_learning_rate + (cfg.learning_rate - cfg.end_learning_rate) * (
        1 + np.cos(np.pi * step / cfg.n_iters)) / 2
    np.testing.assert_allclose(float(updates), -lr * cfg.weight_decay, rtol=1e-5)


def test_augment_noise_and_dropout():
  x = jnp.ones((2000, 16))
  keys = [jax.random.PRNGKey(i) for i in range(40)]
  augment = jax.jit(lfa.augment, static_argnums=(2, 3, 4))
  noisy = [float(jnp.std(augment(k, x, 0.5, 0.0, 0.5))) for k in keys]
  applied = np.array([s > 0 for s in noisy])
  assert 0.2 < applied.mean() < 0.8
  np.testing.assert_allclose(np.array(noisy)[applied], 0.5, rtol=0.05)
  out = np.asarray(augment(keys[0], x, 0.0, 0.25, 1.0))
  assert abs((out == 0).mean() - 0.25) < 0.02
  np.testing.assert_allclose(out[out != 0], 1 / 0.75, rtol=1e-6)


def test_refinement_lowers_the_loss(data):
  w0 = np.eye(DIM, dtype=np.float32)
  before = lfa.objective(w0, data["xtr"], data["ytr"], data["t"])
  w, losses = lfa.refine(w0, data["xtr"], data["ytr"], data["t"], return_losses=True)
  assert losses.shape == (200,) and np.all(np.isfinite(losses))
  assert lfa.objective(w, data["xtr"], data["ytr"], data["t"]) < 0.5 * before


def test_fit_beats_zero_shot(data):
  w, info = lfa.fit(data["xtr"], data["ytr"], data["t"], return_info=True)
  zero_shot = lfa.accuracy(data["xte"], data["yte"], None, data["t"])
  assert 0.3 < zero_shot < 0.8
  assert 0.0 <= info["beta"] <= 1.0
  assert lfa.accuracy(data["xte"], data["yte"], w, data["t"]) > zero_shot + 0.2
  logits = lfa.predict(data["xte"], w, data["t"])
  assert logits.shape == (len(data["xte"]), CLASSES) and np.abs(logits).max() <= 1 + 1e-5


def test_unsupervised_beats_zero_shot_without_labels(data):
  w = lfa.fit_unsupervised(data["xte"], data["t"])
  zero_shot = lfa.accuracy(data["xte"], data["yte"], None, data["t"])
  assert lfa.accuracy(data["xte"], data["yte"], w, data["t"]) > zero_shot + 0.1


def np_sinkhorn(cost, eps, iters=20000):
  """Float64 log-domain Sinkhorn with uniform marginals (an independent reference)."""
  n, c = cost.shape
  f, g = np.zeros(n), np.zeros(c)

  def lse(a, axis):
    m = a.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)

  for _ in range(iters):
    f = -eps * lse((g[None] - cost) / eps + np.log(1 / c), 1)
    g = -eps * lse((f[:, None] - cost) / eps + np.log(1 / n), 0)
  return np.exp((f[:, None] + g[None] - cost) / eps) / (n * c)


def test_sinkhorn_marginals_are_uniform_and_match_a_reference(data):
  x, t = data["xte"][:120], data["t"]
  plan = lfa.sinkhorn_plan(x, t, blur=0.05)
  n, c = plan.shape
  np.testing.assert_allclose(plan.sum(1), 1 / n, rtol=1e-3)
  np.testing.assert_allclose(plan.sum(0), 1 / c, rtol=2e-2)
  soft = lfa.sinkhorn_assignment(x, t)
  np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(soft.sum(0), n / c, rtol=2e-2)
  # GeomLoss blur 0.05 on |x - t|^2 / 2 == epsilon 2 * 0.05^2 on |x - t|^2.
  xn, tn = lfa.normalize(x).astype(np.float64), lfa.normalize(t).astype(np.float64)
  ref = np_sinkhorn(((xn[:, None] - tn[None]) ** 2).sum(-1) / 2, 0.05**2, iters=3000)
  assert np.abs(plan - ref).sum() < 2e-2
  assert np.mean(plan.argmax(1) == ref.argmax(1)) > 0.97


def test_gaussian_projection_is_deterministic_and_normalised():
  x = np.random.default_rng(0).normal(size=(5, 64))
  a, b = lfa.gaussian_projection(x, 16), lfa.gaussian_projection(x, 16)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (5, 16)
  np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)


# --- The command. ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
  t, _, make = synthetic()
  root = tmp_path_factory.mktemp("lfa_cli")
  (x, y), (xt, yt) = make(6, 3), make(20, 4)
  np.savez(root / "train.npz", features=x, labels=y, class_embeddings=t,
           class_names=np.array([f"class {i}" for i in range(CLASSES)]))
  np.savez(root / "test.npz", features=xt, labels=yt)
  np.savez(root / "nolabels.npz", features=x, class_embeddings=t)
  np.savez(root / "nan.npz", features=np.full_like(x, np.nan), labels=y, class_embeddings=t)
  np.savez(root / "badlen.npz", features=x, labels=y[:-1], class_embeddings=t)
  (root / "dir").mkdir()
  for k, v in dict(features=xt, labels=yt, class_embeddings=t).items():
    np.save(root / "dir" / f"{k}.npy", v)
  return root


def test_cli_runs_and_writes_json(npz_files, capsys):
  out = npz_files / "res.json"
  rc = cli.main(["--train", str(npz_files / "train.npz"), "--test", str(npz_files / "dir"),
                 "--shots", "4", "--seeds", "0", "1", "--unsupervised", "--ulfa-on",
                 "test", "--out", str(out), "--n-iters", "50"])
  assert rc == 0
  table = capsys.readouterr().out
  assert "zero-shot" in table and "LFA" in table and "U-LFA(test)" in table
  res = json.loads(out.read_text())
  assert res["config"]["n_iters"] == 50
  methods = [(r["method"], r["shots"], r["seed"]) for r in res["runs"]]
  assert ("LFA", 4, 1) in methods and ("U-LFA(test)", None, 0) in methods
  summary = {(s["method"], s["shots"]): s for s in res["summary"]}
  assert summary[("LFA", 4)]["n"] == 2
  assert summary[("LFA", 4)]["mean"] > summary[("zero-shot", None)]["mean"]


@pytest.mark.parametrize("name,msg", [("nolabels", "missing labels"), ("nan", "NaN"),
                                      ("badlen", "one per feature row"), ("absent", "cannot read")])
def test_cli_bad_input_is_one_line_and_exit_2(npz_files, capsys, name, msg):
  rc = cli.main(["--train", str(npz_files / f"{name}.npz"), "--test",
                 str(npz_files / "test.npz")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1 and msg in err, err


def test_module_entry_point_exits_2(npz_files):
  proc = subprocess.run([sys.executable, "-m", "bigvl.lfa", "--train",
                         str(npz_files / "nolabels.npz"), "--test", str(npz_files / "test.npz")],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"bigvl.lfa: {npz_files / 'nolabels.npz'}: missing labels (has class_embeddings, features)"]


def test_config_flags_cover_every_field():
  args = {f.name for f in dataclasses.fields(lfa.LFAConfig)} - {"seed"}
  ap = cli.argparse.ArgumentParser()
  cli._config_flags(ap)
  assert {a.dest for a in ap._actions} - {"help"} == args
