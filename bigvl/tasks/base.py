"""What a task is: a recipe as pure functions the one train loop (``bigvl/train.py``) calls,
plus the declared interface evaluators see.

A task module ``bigvl/tasks/<name>.py`` defines ``Task(config, mesh)``, a subclass of
:class:`Task`. Its constructor reads every config key it uses (``config.input``,
``config.model``, ``config.loss``, ...) through the strict :class:`bigvl.config.Reader`, builds
its data sources and model, and raises ``ConfigError`` on anything bad -- all before compile.

**Training** (the loop calls these under one ``jax.jit`` over the mesh):

* ``init(rng, batch) -> (params, state)``: parameters and extra task state (not optimised:
  an EMA teacher, BN statistics, a frozen reference model, a queue ...). Parameters may carry
  logical axis names (``nn.with_logical_partitioning``); the loop maps them to mesh axes.
* ``loss(params, state, batch, rng, step) -> (scalar, (metrics, new_state))``. ``params`` is
  the whole parameter tree, trainable and frozen parts merged.
* ``after_step(params, state, step) -> state``: after the optimizer update (EMA, ...).
* ``trainable(path) -> bool``: which parameters (``'/'``-joined path) are optimised; the
  loop also freezes ``config.optim.frozen``. Frozen parameters are held in the train state,
  sharded, and never differentiated: no gradient, no optimizer state.
* ``pretrained() -> [WeightSource]``: file-backed parts of the state (a frozen teacher, a
  DPO reference model) that the loop reads after a fresh init -- never on resume, the
  checkpoint has them -- straight into their shards (``bigvl.checkpoint.read_weights``).
  ``config.init_from`` adds more (a public LM, a previous run's tower).

**On the host**: ``train_data(seed)`` -> an iterator of host-local numpy batches with
``get_state``/``set_state`` (:class:`TrainData`); ``num_train_examples`` for durations in
epochs; ``batch_size`` (global) and ``examples_per_step`` (every example one step
processes, for throughput: a semi-supervised step also reads ``mu * B`` unlabeled images).

**Evaluation** -- evaluators see only :data:`EVAL_CONTRACT` (``train.build`` hands them an
:class:`EvalView`; anything else is an ``AttributeError``):

* ``predict_fns() -> {name: fn(params, state, batch)}``: named pure prediction functions
  (jit-able; ``batch`` is a dict of global arrays). An evaluator config names the one it uses.
* ``eval_transform(kind, **opts) -> fn(example) -> dict``: how an example of an eval split
  becomes a batch row, for the kinds the task declares in ``eval_kinds`` (e.g.
  ``'image_label'`` -> ``{'image', 'label'}``; ``'image_text'`` -> ``{'image', 'tokens'}``).
* ``encode_texts(texts) -> {'tokens': [N, L] int32}``: host-side text encoding (zero-shot
  prompts), for tasks with a text model.
* ``decode_texts(ids) -> [str]``: token ids (``[N, L]``, generated text) back to strings,
  for tasks that generate.
* ``dataset``, ``data_dir``: the default eval dataset and where datasets live.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl.config import ConfigError, Reader

Metrics = dict[str, jax.Array]
#: ``fn(params, state, batch) -> arrays``: a pure prediction function of a task.
PredictFn = Callable[[Any, Any, Mapping[str, jax.Array]], Any]
#: ``fn(example) -> batch row``: a host-side eval transform.
EvalTransform = Callable[[dict], dict]

#: The task attributes an evaluator may use.
EVAL_CONTRACT = ("dataset", "data_dir", "predict_fns", "eval_kinds", "eval_transform",
                 "encode_texts", "decode_texts")


class TrainData(Protocol):
  """What ``train_data`` returns: an iterator of host-local numpy batches, checkpointable."""

  def __iter__(self) -> Iterator[Any]: ...
  def __next__(self) -> Any: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...
  @property
  def num_skipped(self) -> int: ...


class Task:
  """Base class; see the module docstring for the contract."""

  #: metric names the progress line shows after ``loss``.
  progress_keys: tuple[str, ...] = ()
  #: the eval-data kinds ``eval_transform`` accepts.
  eval_kinds: tuple[str, ...] = ()
  dataset: str
  data_dir: str
  batch_size: int

  def __init__(self, config: Reader, mesh: Mesh):
    self.config, self.mesh = config, mesh

  # --- training ---------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    raise NotImplementedError

  @property
  def examples_per_step(self) -> int:
    """Examples one train step processes (throughput); default: the global batch."""
    return self.batch_size

  def train_data(self, seed: int) -> TrainData:
    raise NotImplementedError

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    raise NotImplementedError

  def loss(self, params: Any, state: Any, batch: Any, rng: jax.Array, step: jax.Array
           ) -> tuple[jax.Array, tuple[Metrics, Any]]:
    raise NotImplementedError

  def after_step(self, params: Any, state: Any, step: jax.Array) -> Any:
    return state

  def trainable(self, path: str) -> bool:
    """Whether the parameter at ``path`` (e.g. ``'img/encoder/block0/mlp/fc1/kernel'``) is
    optimised. Default: all (``config.optim.frozen`` freezes more)."""
    return True

  def pretrained(self) -> Sequence[Any]:
    """``[bigvl.checkpoint.WeightSource]`` the loop reads after a fresh init."""
    return ()

  # --- evaluation -------------------------------------------------------------------------
  def predict_fns(self) -> dict[str, PredictFn]:
    return {}

  def eval_transform(self, kind: str, **opts: Any) -> EvalTransform:
    raise ConfigError(f"task {type(self).__module__} has no eval data of kind {kind!r}; it "
                      f"has: {', '.join(self.eval_kinds) or 'none'}")

  def encode_texts(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    raise ConfigError(f"task {type(self).__module__} does not encode texts")

  def decode_texts(self, ids: np.ndarray) -> list[str]:
    raise ConfigError(f"task {type(self).__module__} does not decode texts")


class EvalView:
  """The task as an evaluator sees it: only :data:`EVAL_CONTRACT`."""

  def __init__(self, task: Task):
    object.__setattr__(self, "_task", task)

  def __getattr__(self, name: str) -> Any:
    if name not in EVAL_CONTRACT:
      raise AttributeError(
          f"evaluators may use only the declared task interface {EVAL_CONTRACT} "
          f"(bigvl/tasks/base.py); {name!r} is not part of it")
    return getattr(self._task, name)

  def __setattr__(self, name: str, value: Any) -> None:
    raise TypeError("an evaluator cannot change the task")

  def predict_fn(self, name: str, where: str) -> PredictFn:
    """The prediction function ``name``, or a ConfigError naming ``where`` and the choices."""
    fns = self._task.predict_fns()
    if name not in fns:
      raise ConfigError(f"{where}={name!r}: task {type(self._task).__module__} has prediction "
                        f"functions {', '.join(fns) or 'none'}")
    return fns[name]

  def require_kind(self, kind: str, where: str) -> None:
    if kind not in self._task.eval_kinds:
      raise ConfigError(f"{where}: needs eval data {kind!r}, which task "
                        f"{type(self._task).__module__} does not provide (it has: "
                        f"{', '.join(self._task.eval_kinds) or 'none'})")


def read_mean_std(inp: Reader, default: tuple[float, ...] = (0.5,)
                  ) -> tuple[np.ndarray, np.ndarray]:
  """``input.mean`` / ``input.std`` (per channel, in 0..1 units; default ``default`` each) as
  float32 vectors: a task normalises uint8 images as ``(x / 255 - mean) / std``."""
  mean = np.asarray(inp.get("mean", default), np.float32).reshape(-1)
  std = np.asarray(inp.get("std", default), np.float32).reshape(-1)
  if np.any(std <= 0):
    raise ConfigError(f"{inp.path}.std must be > 0, got {std.tolist()}")
  return mean, std


def embedding_predict_fns(model: Any) -> dict[str, PredictFn]:
  """``embed_images`` (``batch['image'] -> [B, E]``) and ``embed_texts`` (``batch['tokens']
  [B, L] -> [B, E]``) of a model with those methods: what the two-tower evaluators (zero-shot,
  retrieval, compositionality) call, for any image-text task."""
  def embed_images(params, state, batch):
    return model.apply({"params": params}, batch["image"], method="embed_images")

  def embed_texts(params, state, batch):
    return model.apply({"params": params}, batch["tokens"], method="embed_texts")

  return {"embed_images": embed_images, "embed_texts": embed_texts}
