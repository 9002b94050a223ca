"""What a task is: a recipe as pure functions the one train loop (``bigvl/train.py``) calls.

A task module ``bigvl/tasks/<name>.py`` defines ``Task(config, mesh)``, a subclass of
:class:`Task`. Its constructor reads every config key it uses (``config.input``,
``config.model``, ``config.loss``, ...) through the strict :class:`bigvl.config.Reader`, builds
its data sources and model, and raises ``ConfigError`` on anything bad -- all before compile.

The train loop then calls, under one ``jax.jit`` over the mesh:

* ``init(rng, batch) -> (params, state)``: parameters (optimised) and extra task state
  (not optimised: an EMA teacher, BN statistics, a frozen reference model, a queue ...).
* ``loss(params, state, batch, rng, step) -> (scalar, (metrics, new_state))``.
* ``after_step(params, state, step) -> state``: after the optimizer update (EMA, ...).

and on the host: ``train_data(seed)`` -> an iterator of host-local numpy batches with
``get_state``/``set_state``; ``num_train_examples`` for durations in epochs;
``load_frozen(state, shardings) -> state`` after a fresh ``init`` (not on resume: the
checkpoint has it), to read weights from files straight into their shards (a frozen teacher,
a DPO reference model): ``init`` leaves placeholders, so a multi-GB model never becomes a
constant of the init program.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh

from bigvl.config import Reader
from bigvl.data.pipeline import DataIterator

Metrics = dict[str, jax.Array]


class Task:
  """Base class; see the module docstring for the contract."""

  #: metric names the progress line shows after ``loss``.
  progress_keys: tuple[str, ...] = ()

  def __init__(self, config: Reader, mesh: Mesh):
    self.config, self.mesh = config, mesh

  @property
  def num_train_examples(self) -> int:
    raise NotImplementedError

  def train_data(self, seed: int) -> DataIterator:
    raise NotImplementedError

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    raise NotImplementedError

  def loss(self, params: Any, state: Any, batch: Any, rng: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, tuple[Metrics, Any]]:
    raise NotImplementedError

  def after_step(self, params: Any, state: Any, step: jax.Array) -> Any:
    return state

  def load_frozen(self, state: Any, shardings: Any) -> Any:
    """Host side, after a fresh init: ``state`` with file-backed arrays filled in, each placed
    with its entry of ``shardings`` (default: ``state`` as it is)."""
    return state
