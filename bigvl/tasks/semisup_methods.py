"""The semi-supervised methods of ``bigvl.tasks.semisup``, one :class:`Method` unit each, and
their registry :data:`METHODS` (name -> unit).

A unit is a NamedTuple of pure functions, in the spirit of ``optax.GradientTransformation``:
it holds everything that makes a method that method -- its knobs with the papers' defaults,
the unlabeled views it reads, its extra task state, its unlabeled loss and its after-step
update. The task (``bigvl/tasks/semisup.py``) owns what every method shares: the data, the
model, the shared train-mode forward pass over the labeled batch and the unlabeled views
that get gradients, the supervised term and ``L = CE + w(t) * L_u``. A unit may replace that
forward (MixMatch mixes labeled and unlabeled images before it). Adding a method is adding a
unit to :data:`METHODS` plus a config; nothing in the task changes.

The step, for a unit ``m`` with knobs ``hp``::

    fwd            = (m.forward or task.forward)(ctx, inp)       # Forward
    sup            = mean_b CE(fwd.logits_l, fwd.targets_l)
    L_u, w, ms, s' = m.unsup(ctx, inp, fwd)                      # skipped if m.unsup is None
    loss           = sup + w * L_u;  new state = s' with fwd.batch_stats
    after the optimizer update: state = m.after_step(ctx, params, state, step)

Targets are gradient-stopped except the Pi-model's. Knob conventions: ``mu``: unlabeled batch
= mu * labeled batch; ``lambda_u``: the unlabeled weight (its maximum where it ramps up);
``rampup_steps``: length of the ramp-up (sigmoid for Pi / TE / Mean Teacher, linear for
Pseudo-Label / MixMatch; 0 = none).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bigvl.config import check_choice
from bigvl.losses import consistency as C

Array = jax.Array
Hparams = Mapping[str, Any]
#: ``apply(params, batch_stats, x, rng, update_stats=True) -> (logits, batch_stats)``: the
#: model's train-mode forward (batch statistics); with ``update_stats=False`` the running
#: statistics come back unchanged.
ApplyFn = Callable[..., tuple[Array, Any]]


class Context(NamedTuple):
  """What the task gives every unit function besides the step's data (fixed for a run)."""

  hp: Hparams  #: the method's knobs, ``config.semisup`` over the unit's ``defaults``
  apply: ApplyFn  #: the model's train-mode forward
  num_classes: int
  num_unlabeled: int  #: size of the unlabeled set (rows of Temporal Ensembling's accumulator)


class StepInput(NamedTuple):
  """One step's inputs, as the task prepares them (images normalised to float32)."""

  params: Any  #: the whole parameter tree
  state: dict  #: the task state at the start of the step (``batch_stats`` + the unit's own)
  x_l: Array  #: labeled images [B, H, W, C]
  y: Array  #: their labels [B] int32
  views: tuple[Array, ...]  #: the unit's unlabeled views, each [mu B, H, W, C], in ``views`` order
  unlabeled: Mapping[str, Array]  #: ``index`` (row in the unlabeled set), ``label`` (-1: none)
  rng: Array  #: dropout key of every forward pass
  rng_method: Array  #: the method's own randomness (VAT's start, MixMatch's permutation)
  step: Array


class Forward(NamedTuple):
  """What the (shared or overriding) forward pass gives the loss."""

  logits_l: Array  #: logits of the labeled rows [B, C]
  targets_l: Array  #: their targets: labels [B] or soft targets [B, C]
  logits_u: tuple[Array, ...]  #: logits of the unlabeled views that went through it
  batch_stats: Any  #: the updated BN running statistics
  metrics: dict[str, Array]  #: diagnostics (``acc``, ``u_acc``)
  aux: Mapping[str, Array] = MappingProxyType({})  #: what an overriding forward hands ``unsup``


#: ``unsup(ctx, inp, fwd) -> (L_u, w, metrics, new_state)``: the unlabeled term, its weight at
#: ``inp.step``, diagnostics and the task state with the unit's updates (from ``inp.state``).
UnsupFn = Callable[[Context, StepInput, Forward], tuple[Array, Array, dict, dict]]


def _no_state(ctx: Context, params: Any, state: dict) -> dict:
  return state


def _no_update(ctx: Context, params: Any, state: dict, step: Array) -> dict:
  return state


class Method(NamedTuple):
  """One semi-supervised method.

  Fields:
    defaults: knob -> default (``config.semisup.<knob>``; a knob not here is a config error).
    views: ``hp -> ('weak' | 'strong', ...)``: the views of each unlabeled image the host
      makes (stacked ``[V, H, W, C]``); empty = no unlabeled stream (then ``defaults`` has no
      ``mu``).
    unsup: the unlabeled term (:data:`UnsupFn`); None = labeled data only.
    forward_views: how many leading views go through the task's shared forward together
      with the labeled batch (they get gradients and BN sees them).
    init: ``(ctx, params, state) -> state``: adds the unit's extra state to the task state
      (which holds ``batch_stats``).
    after_step: ``(ctx, params, state, step) -> state`` after the optimizer update.
    forward: replaces the task's shared forward: ``(ctx, inp) -> Forward``.
    predictors: extra prediction functions: name -> ``(params, state) -> variables`` of the
      model to evaluate (eval mode); the task always has ``'logits'`` (the trained model).
  """

  defaults: Hparams
  views: Callable[[Hparams], tuple[str, ...]]
  unsup: UnsupFn | None
  forward_views: int = 1
  init: Callable[[Context, Any, dict], dict] = _no_state
  after_step: Callable[[Context, Any, dict, Array], dict] = _no_update
  forward: Callable[[Context, StepInput], Forward] | None = None
  predictors: Mapping[str, Callable[[Any, dict], Any]] = MappingProxyType({})


# --- shared pieces --------------------------------------------------------------------------
def accuracy(logits_or_probs: Array, labels: Array) -> Array:
  """Top-1 accuracy over the rows with a known label (``label >= 0``)."""
  known = (labels >= 0).astype(jnp.float32)
  hit = (jnp.argmax(logits_or_probs, -1) == labels).astype(jnp.float32) * known
  return jnp.sum(hit) / jnp.maximum(jnp.sum(known), 1.0)


def fixed_views(*kinds: str) -> Callable[[Hparams], tuple[str, ...]]:
  """``views`` of a method whose views do not depend on its knobs."""
  return lambda hp: kinds


def weight(hp: Hparams, step: Array, ramp: Callable[[Array, float], Array] | None = None
           ) -> Array:
  """``w(t) = lambda_u * ramp(t, rampup_steps)``; ``lambda_u`` when ``ramp`` is None."""
  if ramp is None:
    return jnp.asarray(hp["lambda_u"], jnp.float32)
  return hp["lambda_u"] * ramp(step, hp.get("rampup_steps", 0))


def confidence(logits: Array, threshold: float) -> Array:
  """The ``mask`` diagnostic: fraction of rows with ``max softmax(logits) >= threshold``."""
  return jnp.mean(C.fixmatch_mask(jax.nn.softmax(logits), threshold))


# --- the methods ----------------------------------------------------------------------------
def _pi_model(ctx: Context, inp: StepInput, fwd: Forward):
  """Pi-model (Laine & Aila 2017): ``mse(p(u1), p(u2))``, two weak views, both with gradient;
  sigmoid ramp-up."""
  u1, u2 = fwd.logits_u
  unsup = jnp.mean(C.mse(jax.nn.softmax(u1), jax.nn.softmax(u2)))
  return unsup, weight(ctx.hp, inp.step, C.sigmoid_rampup), {}, inp.state


def _te_init(ctx: Context, params: Any, state: dict) -> dict:
  return {**state, "ensemble": jnp.zeros((ctx.num_unlabeled, ctx.num_classes), jnp.float32),
          "ensemble_count": jnp.zeros((ctx.num_unlabeled,), jnp.int32)}


def _temporal_ensembling(ctx: Context, inp: StepInput, fwd: Forward):
  """Temporal Ensembling (Laine & Aila 2017, Alg. 2), updated per visit: ``mse(p(u_i),
  Z_i / (1 - a^n_i))`` over examples seen before (``n_i > 0``), then ``Z_i <- a Z_i +
  (1 - a) p(u_i)``, ``n_i += 1``; rows indexed by the example's ``index``; sigmoid ramp-up."""
  alpha, idx, state = ctx.hp["ensemble_momentum"], inp.unlabeled["index"], inp.state
  z = jax.nn.softmax(fwd.logits_u[0])
  ens, count = state["ensemble"][idx], state["ensemble_count"][idx]
  seen = count > 0
  target = ens / jnp.where(seen, 1.0 - alpha ** count.astype(jnp.float32), 1.0)[:, None]
  unsup = jnp.mean(seen * C.mse(z, jax.lax.stop_gradient(target)))
  new_ens, _ = C.temporal_ensemble_update(ens, jax.lax.stop_gradient(z), alpha,
                                          (count + 1)[:, None])
  new_state = {**state, "ensemble": state["ensemble"].at[idx].set(new_ens),
               "ensemble_count": state["ensemble_count"].at[idx].set(count + 1)}
  metrics = {"mask": jnp.mean(seen.astype(jnp.float32))}
  return unsup, weight(ctx.hp, inp.step, C.sigmoid_rampup), metrics, new_state


def _student(params: Any, state: dict) -> dict:
  return {"params": params, "batch_stats": state["batch_stats"]}


def _mt_init(ctx: Context, params: Any, state: dict) -> dict:
  return {**state, "teacher": jax.tree.map(jnp.copy, _student(params, state))}


def _mean_teacher(ctx: Context, inp: StepInput, fwd: Forward):
  """Mean Teacher (Tarvainen & Valpola 2017): ``mse(p_student(u1), p_teacher(u2))``; the
  teacher's forward runs in train mode (batch statistics) and updates nothing; sigmoid
  ramp-up."""
  teacher = inp.state["teacher"]
  logits_t, _ = ctx.apply(teacher["params"], teacher["batch_stats"], inp.views[1], inp.rng,
                          False)
  p_t = jax.lax.stop_gradient(jax.nn.softmax(logits_t))
  unsup = jnp.mean(C.mse(jax.nn.softmax(fwd.logits_u[0]), p_t))
  metrics = {"teacher_u_acc": accuracy(logits_t, inp.unlabeled["label"])}
  return unsup, weight(ctx.hp, inp.step, C.sigmoid_rampup), metrics, inp.state


def _mt_after_step(ctx: Context, params: Any, state: dict, step: Array) -> dict:
  """``teacher <- d teacher + (1 - d) student``, ``d = ema_decay_rampup`` during the ramp-up,
  ``ema_decay`` after, and ``d <= 1 - 1/(step + 2)`` (the Mean Teacher code's warm-up: the
  first teachers are plain averages of the students)."""
  hp = ctx.hp
  decay = jnp.where(step < hp["rampup_steps"], hp["ema_decay_rampup"], hp["ema_decay"])
  decay = jnp.minimum(decay, 1.0 - 1.0 / (step.astype(jnp.float32) + 2.0))
  return {**state, "teacher": C.ema_update(state["teacher"], _student(params, state), decay)}


def _vat(ctx: Context, inp: StepInput, fwd: Forward):
  """VAT (Miyato et al. 2018): ``KL(p(u) || p(u + r_adv))``, ``r_adv`` by power iteration.
  Train-mode BN over the unlabeled batch alone, statistics not updated (as in the VAT code),
  so ``p(u)`` and ``p(u + r)`` are the same function of the input."""
  hp = ctx.hp

  def logits_fn(x):
    return ctx.apply(inp.params, inp.state["batch_stats"], x, inp.rng, False)[0]

  unsup = C.vat_loss(logits_fn, inp.views[0], inp.rng_method, xi=hp["xi"], eps=hp["eps"],
                     num_power_iterations=hp["power_iterations"])
  return unsup, weight(hp, inp.step), {}, inp.state


def _pseudo_label(ctx: Context, inp: StepInput, fwd: Forward):
  """Pseudo-Label (Lee 2013): ``1[max p(u) >= tau] CE(argmax p(u), p(u))``; linear ramp-up."""
  logits, tau = fwd.logits_u[0], ctx.hp["threshold"]
  return (C.pseudo_label_loss(logits, tau), weight(ctx.hp, inp.step, C.linear_rampup),
          {"mask": confidence(logits, tau)}, inp.state)


def _entropy_min(ctx: Context, inp: StepInput, fwd: Forward):
  """Entropy Minimization (Grandvalet & Bengio 2005): ``H(p(u))``."""
  return jnp.mean(C.entropy(fwd.logits_u[0])), weight(ctx.hp, inp.step), {}, inp.state


def _mixmatch_forward(ctx: Context, inp: StepInput) -> Forward:
  """MixMatch (Berthelot et al. 2019): the label guess ``q = sharpen(1/K sum_k p(u_k), T)``
  (one forward of the K views, statistics not updated, stop-gradient); ``X' = [x; u_1..u_K]``
  with targets ``[onehot(y); q x K]`` MixUp'ed with a random permutation of itself,
  ``lambda' = max(lambda, 1 - lambda)``, ``lambda ~ Beta(alpha, alpha)`` per example; one
  forward of the mixed batch. The labeled term is CE on the mixed labeled rows."""
  hp, bs, views = ctx.hp, inp.state["batch_stats"], inp.views
  k, nu, b = len(views), views[0].shape[0], inp.x_l.shape[0]
  guess_logits, _ = ctx.apply(inp.params, bs, jnp.concatenate(views), inp.rng, False)
  guess_logits = jax.lax.stop_gradient(guess_logits)
  q = C.guess_labels(guess_logits.reshape(k, nu, -1), hp["temperature"])
  x_all = jnp.concatenate([inp.x_l, *views])
  p_all = jnp.concatenate([jax.nn.one_hot(inp.y, ctx.num_classes)] + [q] * k)
  r_perm, r_lam = jax.random.split(inp.rng_method)
  perm = jax.random.permutation(r_perm, x_all.shape[0])
  lam = C.sample_mixup_lambda(r_lam, hp["mixup_alpha"], (x_all.shape[0],))
  x_mix, p_mix = C.mixup(x_all, p_all, x_all[perm], p_all[perm], lam)
  logits, new_bs = ctx.apply(inp.params, bs, x_mix, inp.rng)
  return Forward(logits_l=logits[:b], targets_l=p_mix[:b], logits_u=(logits[b:],),
                 batch_stats=new_bs, metrics={"u_acc": accuracy(q, inp.unlabeled["label"])},
                 aux={"targets_u": p_mix[b:]})


def _mixmatch(ctx: Context, inp: StepInput, fwd: Forward):
  """MixMatch's unlabeled term: ``mse(p(U''), q'')`` on the mixed unlabeled rows; linear
  ramp-up."""
  unsup = jnp.mean(C.mse(jax.nn.softmax(fwd.logits_u[0]), fwd.aux["targets_u"]))
  return unsup, weight(ctx.hp, inp.step, C.linear_rampup), {}, inp.state


def _uda(ctx: Context, inp: StepInput, fwd: Forward):
  """UDA (Xie et al. 2020): ``1[max p(w) >= beta] KL(softmax(f(w) / T) || p(s))``, w / s the
  weak / strong views."""
  weak, strong = fwd.logits_u
  hp = ctx.hp
  unsup = C.uda_loss(weak, strong, hp["temperature"], hp["threshold"])
  return unsup, weight(hp, inp.step), {"mask": confidence(weak, hp["threshold"])}, inp.state


def _fixmatch(ctx: Context, inp: StepInput, fwd: Forward):
  """FixMatch (Sohn et al. 2020): ``1[max p(w) >= tau] CE(argmax p(w), p(s))``."""
  weak, strong = fwd.logits_u
  tau = ctx.hp["threshold"]
  return (C.fixmatch_loss(weak, strong, tau), weight(ctx.hp, inp.step),
          {"mask": confidence(weak, tau)}, inp.state)


#: The registry: ``config.method`` -> unit. Defaults are the papers' knobs.
METHODS: dict[str, Method] = {
    # The baseline: the labeled stream only.
    "supervised": Method(defaults={}, views=fixed_views(), unsup=None, forward_views=0),
    # Laine & Aila 2017: w_max 100 (relative to the labeled CE: their M/N scaling cancels),
    # Gaussian ramp-up over 80 epochs (40k steps of 100).
    "pi_model": Method(
        defaults={"mu": 1, "lambda_u": 100.0, "rampup_steps": 40_000},
        views=fixed_views("weak", "weak"), unsup=_pi_model, forward_views=2),
    # Laine & Aila 2017: w_max 30, ensemble momentum alpha 0.6.
    "temporal_ensembling": Method(
        defaults={"mu": 1, "lambda_u": 30.0, "rampup_steps": 40_000, "ensemble_momentum": 0.6},
        views=fixed_views("weak"), unsup=_temporal_ensembling, init=_te_init),
    # Tarvainen & Valpola 2017 (their CIFAR/SVHN code): consistency cost 100, ramp-up 40k
    # steps, EMA decay 0.99 during the ramp-up and 0.999 after. The second view is the
    # teacher's.
    "mean_teacher": Method(
        defaults={"mu": 1, "lambda_u": 100.0, "rampup_steps": 40_000, "ema_decay": 0.999,
                  "ema_decay_rampup": 0.99},
        views=fixed_views("weak", "weak"), unsup=_mean_teacher, init=_mt_init,
        after_step=_mt_after_step, predictors={"teacher_logits": lambda p, s: s["teacher"]}),
    # Miyato et al. 2018: alpha 1, xi 1e-6, one power iteration; eps 6.0 as in Oliver et al.
    # 2018 (WRN-28-2, CIFAR-10). eps is an L2 norm over the whole normalised image.
    "vat": Method(
        defaults={"mu": 1, "lambda_u": 1.0, "eps": 6.0, "xi": 1e-6, "power_iterations": 1},
        views=fixed_views("weak"), unsup=_vat),
    # Lee 2013 with the confidence threshold and weight of Oliver et al. 2018.
    "pseudo_label": Method(
        defaults={"mu": 1, "lambda_u": 1.0, "threshold": 0.95, "rampup_steps": 0},
        views=fixed_views("weak"), unsup=_pseudo_label),
    # Grandvalet & Bengio 2005 (lambda is cross-validated there; 1 as in VAT+EntMin).
    "entropy_min": Method(defaults={"mu": 1, "lambda_u": 1.0}, views=fixed_views("weak"),
                          unsup=_entropy_min),
    # Berthelot et al. 2019: T 0.5, K 2, Beta(0.75, 0.75), lambda_u 100 ramped up linearly
    # over 16k steps, 64 labeled + 64 unlabeled per batch. K weak views, all in its own
    # forward.
    "mixmatch": Method(
        defaults={"mu": 1, "lambda_u": 100.0, "rampup_steps": 16_384, "temperature": 0.5,
                  "num_augs": 2, "mixup_alpha": 0.75},
        views=lambda hp: ("weak",) * hp["num_augs"], unsup=_mixmatch, forward_views=0,
        forward=_mixmatch_forward),
    # Xie et al. 2020 (CIFAR-10): T 0.4, confidence beta 0.8, weight 1; mu 7 as FixMatch
    # ran it.
    "uda": Method(defaults={"mu": 7, "lambda_u": 1.0, "temperature": 0.4, "threshold": 0.8},
                  views=fixed_views("weak", "strong"), unsup=_uda, forward_views=2),
    # Sohn et al. 2020: tau 0.95, lambda_u 1, mu 7.
    "fixmatch": Method(defaults={"mu": 7, "lambda_u": 1.0, "threshold": 0.95},
                       views=fixed_views("weak", "strong"), unsup=_fixmatch, forward_views=2),
}


def default_hparams(method: str) -> dict[str, Any]:
  """A copy of ``METHODS[method].defaults`` (configs start from it)."""
  return dict(METHODS[check_choice("config.method", method, tuple(METHODS))].defaults)
