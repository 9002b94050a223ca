"""The optimizer from ``config.optim`` and ``config.schedule``, as one optax chain.

* ``optim.name``: ``adamw`` | ``adam`` | ``sgd`` (momentum, nesterov) | ``lion``.
* ``optim.lr``: peak learning rate; ``schedule``: linear warm-up over ``warmup_steps`` (or
  ``warmup_frac`` of the run) then ``decay`` = ``cosine`` | ``linear`` | ``constant`` |
  ``rsqrt``, down to ``lr * end_frac``.
* ``optim.wd``: decoupled weight decay, applied to parameters whose path matches
  ``optim.wd_mask`` (default: kernels/embeddings with ndim >= 2).
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
                       ("cosine", "linear", "constant", "rsqrt"))
  end = peak * get("end_frac", 0.0)
  rest = max(total_steps - warm, 1)
  if decay == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=end / peak if peak else 0.0)
  elif decay == "linear":
    main = optax.linear_schedule(peak, end, rest)
  elif decay == "rsqrt":
    main = lambda s: peak * jax.lax.rsqrt(1.0 + s / max(warm, 1))
  else:
    main = optax.constant_schedule(peak)
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), main], [warm])


def _path_mask(params: Any, pred) -> Any:
  return jax.tree_util.tree_map_with_path(lambda p, x: pred(path_str(p), x), params)


def _regexes(items: Any, what: str) -> list[re.Pattern]:
  try:
    return [re.compile(rx) for rx in items or ()]
  except (re.error, TypeError) as e:
    raise ConfigError(f"config.optim.{what}: bad regex: {e}") from None


def make_optimizer(cfg: Reader, sched_cfg: Reader | None, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, lr_schedule)``; ``tx.update(grads, state, params)`` as usual."""
  name = check_choice("config.optim.name", cfg.get("name", "adamw"),
                      ("adamw", "adam", "sgd", "lion"))
  lr = cfg.typed("lr", (float, int))
  sched = schedule(float(lr), total_steps, sched_cfg)
  wd = float(cfg.typed("wd", (float, int), 0.0))
  clip = float(cfg.typed("clip_norm", (float, int), 0.0))
  wd_rx = _regexes(cfg.get("wd_mask", None), "wd_mask")
  mults = [(re.compile(rx), float(m)) for rx, m in (cfg.get("lr_mults", ()) or ())]
  b1 = float(cfg.typed("b1", (float, int), 0.9))
  b2 = float(cfg.typed("b2", (float, int), 0.999))
  momentum = float(cfg.typed("momentum", (float, int), 0.9))
  nesterov = bool(cfg.typed("nesterov", bool, True))

  def decay_mask(params):
    if wd_rx:
      return _path_mask(params, lambda p, x: any(r.search(p) for r in wd_rx))
    return jax.tree.map(lambda x: x.ndim >= 2, params)

  parts = []
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if name in ("adamw", "adam"):
    parts.append(optax.scale_by_adam(b1=b1, b2=b2))
  elif name == "lion":
    parts.append(optax.scale_by_lion(b1=b1, b2=b2))
  else:
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  if wd > 0 and name != "adam":
    parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
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
