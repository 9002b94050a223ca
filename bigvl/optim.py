"""The optimizer from ``config.optim`` and ``config.schedule``, as one optax chain.

* ``optim.name``: ``adamw`` | ``adam`` (``b1`` 0.9, ``b2`` 0.999, ``eps`` 1e-8) | ``lion``
  (``b1`` 0.9, ``b2`` 0.99) | ``sgd`` (``momentum`` 0.9, ``nesterov`` True). A key of
  ``config.optim`` that the chosen optimizer does not use is a ConfigError
  (:data:`OPTIMIZER_KNOBS`; every optimizer uses :data:`COMMON_KNOBS`).
* ``optim.lr``: peak learning rate; ``schedule``: linear warm-up over ``warmup_steps`` (or
  ``warmup_frac`` of the run) then ``decay`` = ``cosine`` | ``linear`` | ``constant`` |
  ``rsqrt`` | ``poly`` (``(1 - t/T)^power``, ``power`` 0.9), down to ``lr * end_frac``.
* ``optim.wd``: weight decay, applied to parameters whose path matches ``optim.wd_mask``
  (default: kernels/embeddings with ndim >= 2): decoupled (added to the update, then scaled
  by the lr) for adamw, lion and sgd; an L2 term of the gradient for adam.
* ``optim.frozen``: regexes of parameters that are not trained. The loop reads it
  (:func:`frozen_predicate`) and splits them off before differentiating: they get no
  gradient and no optimizer state (``bigvl.train``).
* ``optim.lr_mults``: ``((regex, multiplier), ...)``, the first match wins.
* ``optim.clip_norm``: global gradient-norm clipping (0 = off).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bigvl.config import ConfigError, Reader, check_choice
from bigvl.parallel import path_str


def schedule(peak: float, total_steps: int, cfg: Reader | None) -> optax.Schedule:
  get = cfg.get if cfg is not None else (lambda k, d=None: d)
  warm = get("warmup_steps", None)
  if warm is None:
    warm = int(round(get("warmup_frac", 0.0) * total_steps))
  decay = check_choice("config.schedule.decay", get("decay", "cosine"),
                       ("cosine", "linear", "constant", "rsqrt", "poly"))
  end = peak * get("end_frac", 0.0)
  rest = max(total_steps - warm, 1)
  if decay == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=end / peak if peak else 0.0)
  elif decay == "linear":
    main = optax.linear_schedule(peak, end, rest)
  elif decay == "poly":  # (1 - t / T)^power: DeepLab / PSPNet / CCT's "Poly" (power 0.9)
    main = optax.polynomial_schedule(peak, end, float(get("power", 0.9)), rest)
  elif decay == "rsqrt":
    main = lambda s: peak * jax.lax.rsqrt(1.0 + s / max(warm, 1))
  else:
    main = optax.constant_schedule(peak)
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])


def _path_mask(params: Any, pred) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, x: pred(path_str(p), x), params)


#: ``config.optim`` keys every optimizer reads (``frozen`` is read by the loop).
COMMON_KNOBS = ("name", "lr", "wd", "clip_norm", "wd_mask", "lr_mults", "frozen")
#: The keys each optimizer reads besides :data:`COMMON_KNOBS`; any other key is an error.
OPTIMIZER_KNOBS = {
    "adamw": ("b1", "b2", "eps"),
    "adam": ("b1", "b2", "eps"),
    "lion": ("b1", "b2"),
    "sgd": ("momentum", "nesterov"),
}


def _regexes(items: Any, what: str) -> list[re.Pattern]:
  out = []
  for rx in items or ():
    try:
      out.append(re.compile(rx))
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.optim.{what}: bad regex {rx!r}: {e}") from None
  return out


def _lr_mults(items: Any) -> list[tuple[re.Pattern, float]]:
  pairs = []
  for item in items or ():
    if (not isinstance(item, (tuple, list)) or len(item) != 2 or isinstance(item[1], bool)
        or not isinstance(item[1], (int, float))):
      raise ConfigError(f"config.optim.lr_mults: {item!r} is not a (regex, multiplier) pair")
    pairs.append((_regexes([item[0]], "lr_mults")[0], float(item[1])))
  return pairs


def _check_knobs(cfg: Reader, name: str) -> None:
  """A key of ``config.optim`` that optimizer ``name`` does not use is a ConfigError."""
  used = COMMON_KNOBS + OPTIMIZER_KNOBS[name]
  for key in cfg.keys():
    if key not in cfg:  # None is unset
      cfg.mark_read(key)
    elif key not in used:
      raise ConfigError(f"config.optim.{key} is not used by optim.name={name!r}; its knobs: "
                        f"{', '.join(used)}")


def _scale_by(name: str, cfg: Reader) -> optax.GradientTransformation:
  """The optimizer's own update direction (before weight decay and the learning rate)."""
  num = lambda key, default: float(cfg.typed(key, (float, int), default))
  if name in ("adamw", "adam"):
    return optax.scale_by_adam(b1=num("b1", 0.9), b2=num("b2", 0.999), eps=num("eps", 1e-8))
  if name == "lion":
    return optax.scale_by_lion(b1=num("b1", 0.9), b2=num("b2", 0.99))
  return optax.trace(decay=num("momentum", 0.9), nesterov=cfg.typed("nesterov", bool, True))


def make_optimizer(cfg: Reader, sched_cfg: Reader | None, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, lr_schedule)``; ``tx.update(grads, state, params)`` as usual."""
  name = check_choice("config.optim.name", cfg.get("name", "adamw"), tuple(OPTIMIZER_KNOBS))
  _check_knobs(cfg, name)
  lr = cfg.typed("lr", (float, int))
  sched = schedule(float(lr), total_steps, sched_cfg)
  wd = float(cfg.typed("wd", (float, int), 0.0))
  clip = float(cfg.typed("clip_norm", (float, int), 0.0))
  wd_rx = _regexes(cfg.get("wd_mask", None), "wd_mask")
  mults = _lr_mults(cfg.get("lr_mults", ()))

  def decay_mask(params):
    if wd_rx:
      return _path_mask(params, lambda p, x: any(r.search(p) for r in wd_rx))
    return jax.tree.map(lambda x: x.ndim >= 2, params)

  decay = [optax.add_decayed_weights(wd, mask=decay_mask)] if wd > 0 else []
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  if name == "adam":  # L2: wd * param joins the gradient before Adam's scaling
    parts += decay + [_scale_by(name, cfg)]
  else:  # decoupled: wd * param joins the update after it
    parts += [_scale_by(name, cfg)] + decay
  if mults:
    def mult_tree(params):
      def one(p, x):
        for rx, m in mults:
          if rx.search(p):
            return jnp.asarray(m, jnp.float32)
        return jnp.asarray(1.0, jnp.float32)
      return _path_mask(params, one)
    parts.append(optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda u, s, params=None: (jax.tree.map(lambda g, m: g * m, u, mult_tree(u)), s)))
  parts.append(optax.scale_by_learning_rate(sched))
  return optax.chain(*parts), sched


def frozen_predicate(cfg: Reader):
  """``optim.frozen`` regexes -> ``is_frozen(path) -> bool`` (``re.search`` on the
  ``'/'``-joined parameter path)."""
  frozen_rx = _regexes(cfg.get("frozen", ()), "frozen")
  return lambda path: any(r.search(path) for r in frozen_rx)
