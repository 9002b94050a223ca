"""``bigvl.optim``: schedules, weight-decay mask, lr multipliers, clipping and the optimizers'
updates against hand-written formulas; unused knobs and bad regexes are config errors."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bigvl import optim
from bigvl.config import ConfigError, Reader

LR = 0.1


def _reader(d: dict, path: str) -> Reader:
  return Reader(ml_collections.ConfigDict(d), path)


def make(total_steps: int = 100, schedule: dict | None = None, **optim_cfg):
  """``(tx, schedule)`` for ``config.optim = optim_cfg`` (constant lr by default)."""
  sched = _reader(schedule or {"decay": "constant", "warmup_steps": 0}, "config.schedule")
  return optim.make_optimizer(_reader({"lr": LR, **optim_cfg}, "config.optim"), sched,
                              total_steps)


def params():
  return {"dense": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.5]]),
                    "bias": jnp.array([0.5, -1.0])},
          "embed": {"embedding": jnp.array([[2.0, 4.0]])}}


def grads():
  return {"dense": {"kernel": jnp.array([[0.3, -0.1], [0.2, 0.4]]),
                    "bias": jnp.array([-0.2, 0.6])},
          "embed": {"embedding": jnp.array([[0.5, -0.3]])}}


def steps(tx, grad_list, p=None):
  """Applies ``tx`` to ``grad_list`` in turn; returns each step's updates (numpy trees)."""
  p = params() if p is None else p
  state = tx.init(p)
  out = []
  for g in grad_list:
    u, state = tx.update(g, state, p)
    p = {k: {n: p[k][n] + u[k][n] for n in p[k]} for k in p}
    out.append({k: {n: np.asarray(v) for n, v in d.items()} for k, d in u.items()})
  return out


def assert_tree_close(a, b, **kw):
  for k in a:
    for n in a[k]:
      np.testing.assert_allclose(a[k][n], b[k][n], err_msg=f"{k}/{n}", **kw)


# --- schedules --------------------------------------------------------------------------------
PEAK, TOTAL, WARM, END = 0.1, 100, 10, 0.2


@pytest.mark.parametrize("decay, after_warmup", [
    ("cosine", lambda t: PEAK * END + (PEAK - PEAK * END) * 0.5 * (1 + math.cos(math.pi * t))),
    ("linear", lambda t: PEAK + (PEAK * END - PEAK) * t),
    ("constant", lambda t: PEAK),
    ("rsqrt", lambda t: PEAK / math.sqrt(1 + t * (TOTAL - WARM) / WARM)),
    ("poly", lambda t: PEAK * END + (PEAK - PEAK * END) * (1 - t) ** 0.9),
])
def test_warmup_then_decay(decay, after_warmup):
  for how in ({"warmup_steps": WARM}, {"warmup_frac": WARM / TOTAL}):
    sched = optim.schedule(PEAK, TOTAL, _reader({"decay": decay, "end_frac": END, **how},
                                                "config.schedule"))
    for s in (0, 1, 5, 9):
      assert float(sched(s)) == pytest.approx(PEAK * s / WARM, rel=1e-6), (decay, s)
    for s in (10, 11, 37, 55, 99, 100):
      want = after_warmup((s - WARM) / (TOTAL - WARM))
      assert float(sched(s)) == pytest.approx(want, rel=1e-5), (decay, s)


def test_no_warmup_starts_at_peak():
  sched = optim.schedule(PEAK, TOTAL, _reader({"decay": "linear"}, "config.schedule"))
  assert float(sched(0)) == pytest.approx(PEAK)
  assert float(sched(50)) == pytest.approx(PEAK / 2)


# --- weight decay, multipliers, clipping --------------------------------------------------------
def zero_grads():
  return {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params().items()}


def test_weight_decay_default_mask_is_ndim_at_least_2():
  (u,) = steps(make(name="sgd", momentum=0.0, nesterov=False, wd=0.5)[0], [zero_grads()])
  p = params()
  np.testing.assert_allclose(u["dense"]["kernel"], -LR * 0.5 * p["dense"]["kernel"])
  np.testing.assert_allclose(u["embed"]["embedding"], -LR * 0.5 * p["embed"]["embedding"])
  np.testing.assert_array_equal(u["dense"]["bias"], 0.0)  # 1-D: no decay


def test_weight_decay_mask_regex_picks_the_decayed_params():
  tx, _ = make(name="sgd", momentum=0.0, nesterov=False, wd=0.5, wd_mask=("bias$",))
  (u,) = steps(tx, [zero_grads()])
  np.testing.assert_allclose(u["dense"]["bias"], -LR * 0.5 * params()["dense"]["bias"])
  np.testing.assert_array_equal(u["dense"]["kernel"], 0.0)
  np.testing.assert_array_equal(u["embed"]["embedding"], 0.0)


@pytest.mark.parametrize("wd, n_steps", [(0.0, 3), (0.1, 1)])  # wd: decay is scaled too
def test_lr_mults_scale_a_matched_params_update_exactly(wd, n_steps):
  rules = (("embed/", 0.25), ("embed|bias", 3.0), ("bias", 7.0))
  gs = [grads(), grads2(), grads()][:n_steps]
  base = steps(make(name="adamw", wd=wd)[0], gs)
  mult = steps(make(name="adamw", wd=wd, lr_mults=rules)[0], gs)
  for b, m in zip(base, mult, strict=True):
    np.testing.assert_allclose(m["embed"]["embedding"], 0.25 * b["embed"]["embedding"],
                               rtol=1e-6)  # the first matching rule wins
    np.testing.assert_allclose(m["dense"]["bias"], 3.0 * b["dense"]["bias"], rtol=1e-6)
    np.testing.assert_array_equal(m["dense"]["kernel"], b["dense"]["kernel"])


def test_clipping_scales_the_gradient_to_the_global_norm():
  g = grads()
  norm = math.sqrt(sum(float(jnp.sum(x ** 2)) for d in g.values() for x in d.values()))
  assert norm > 0.5
  (u,) = steps(make(name="sgd", momentum=0.0, nesterov=False, clip_norm=0.5)[0], [g])
  want = {k: {n: -LR * np.asarray(x) * 0.5 / norm for n, x in d.items()} for k, d in g.items()}
  assert_tree_close(u, want, rtol=1e-6)
  (u,) = steps(make(name="sgd", momentum=0.0, nesterov=False, clip_norm=10.0)[0], [g])
  assert_tree_close(u, {k: {n: -LR * np.asarray(x) for n, x in d.items()}
                        for k, d in g.items()}, rtol=1e-6)  # under the norm: unchanged


# --- the optimizers' updates, by hand ----------------------------------------------------------
def grads2():
  return {k: {n: -3.0 * x + 0.1 for n, x in d.items()} for k, d in grads().items()}


def leafwise(fn, *trees):
  return {k: {n: fn(*(np.asarray(t[k][n], np.float64) for t in trees)) for n in trees[0][k]}
          for k in trees[0]}


def decayed(p):
  return leafwise(lambda x: x * (x.ndim >= 2), p)


def test_lion_two_steps_by_hand():
  b1, b2, wd = 0.9, 0.5, 0.2
  g1 = grads()
  g2 = leafwise(lambda g: -0.2 * g, g1)  # small and opposite: the momentum decides its sign
  u1, u2 = steps(make(name="lion", b1=b1, b2=b2, wd=wd)[0], [g1, g2])
  p0 = params()
  want1 = leafwise(lambda g, d: -LR * (np.sign((1 - b1) * g) + wd * d), g1, decayed(p0))
  assert_tree_close(u1, want1, rtol=1e-6)
  p1 = leafwise(np.add, p0, want1)
  m1 = leafwise(lambda g: (1 - b2) * g, g1)
  direction = leafwise(lambda m, g: np.sign(b1 * m + (1 - b1) * g), m1, g2)
  want2 = leafwise(lambda s, d: -LR * (s + wd * d), direction, decayed(p1))
  assert_tree_close(u2, want2, rtol=1e-6)
  np.testing.assert_array_equal(direction["dense"]["bias"], np.sign(g1["dense"]["bias"]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_momentum_two_steps_by_hand(nesterov):
  mu = 0.9
  u1, u2 = steps(make(name="sgd", momentum=mu, nesterov=nesterov)[0], [grads(), grads2()])
  t1 = leafwise(lambda g: g, grads())
  t2 = leafwise(lambda g, t: g + mu * t, grads2(), t1)
  if nesterov:  # the update looks one momentum step ahead
    want1 = leafwise(lambda g, t: -LR * (g + mu * t), grads(), t1)
    want2 = leafwise(lambda g, t: -LR * (g + mu * t), grads2(), t2)
  else:
    want1, want2 = leafwise(lambda t: -LR * t, t1), leafwise(lambda t: -LR * t, t2)
  assert_tree_close(u1, want1, rtol=1e-6)
  assert_tree_close(u2, want2, rtol=1e-6)


def test_adamw_decoupled_and_adam_l2_first_step_by_hand():
  wd, eps = 0.3, 1e-3
  (uw,) = steps(make(name="adamw", wd=wd, eps=eps)[0], [grads()])
  want = leafwise(lambda g, d: -LR * (g / (np.abs(g) + eps) + wd * d), grads(), decayed(params()))
  assert_tree_close(uw, want, atol=2e-6)  # float32 bias correction
  # adam: wd * param joins the gradient before Adam's normalisation.
  (ua,) = steps(make(name="adam", wd=wd, eps=eps)[0], [grads()])
  g2 = leafwise(np.add, grads(), leafwise(lambda d: wd * d, decayed(params())))
  assert_tree_close(ua, leafwise(lambda g: -LR * g / (np.abs(g) + eps), g2), atol=2e-6)


# --- config errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, knob", [("adamw", "momentum"), ("adam", "nesterov"),
                                        ("lion", "eps"), ("sgd", "b1"), ("sgd", "b2"),
                                        ("adamw", "lerning_rate")])
def test_a_knob_the_optimizer_does_not_use_is_an_error(name, knob):
  with pytest.raises(ConfigError, match=f"config.optim.{knob} is not used by "
                                        f"optim.name='{name}'"):
    make(name=name, **{knob: 0.5})


def test_each_optimizer_accepts_its_own_knobs():
  make(name="adamw", b1=0.8, b2=0.9, eps=1e-6, wd=0.1, clip_norm=1.0, wd_mask=("kernel",),
       lr_mults=(("bias", 2.0),), frozen=("embed",))
  make(name="adam", b1=0.8, b2=0.9, eps=1e-6)
  make(name="lion", b1=0.8, b2=0.9)
  make(name="sgd", momentum=0.5, nesterov=False)


@pytest.mark.parametrize("cfg, needle", [
    ({"lr_mults": (("img/(", 2.0),)}, r"lr_mults: bad regex 'img/\('"),
    ({"lr_mults": (("img/", "x"),)}, "not a \\(regex, multiplier\\) pair"),
    ({"lr_mults": ("img/",)}, "not a \\(regex, multiplier\\) pair"),
    ({"wd_mask": ("[kernel",)}, r"wd_mask: bad regex '\[kernel'"),
])
def test_bad_regex_or_pair_is_a_config_error(cfg, needle):
  with pytest.raises(ConfigError, match=needle):
    make(name="adamw", **cfg)
