"""Orbax checkpoints of the whole run -- train state (trainable and frozen params, optimizer
state, task state, step, rng) and the data iterator's state, so a resumed run continues
exactly -- and the one place that reads weights from files into part of a state
(:func:`read_weights`: a previous run's tower, a frozen teacher, a public checkpoint in
safetensors), each array straight into its shards.

Restoring tries the newest step first; an unreadable one is reported with a warning and the
previous one is used. Nothing is ever unpickled: arrays go through orbax's tensorstore
format and the iterator state through JSON.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from bigvl.config import ConfigError

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts,
                                       item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})))

  def restore_latest(self, abstract_state: Any, max_step: int | None = None
                     ) -> tuple[int, Any, dict] | None:
    """``(step, state, data_state)`` from the newest readable checkpoint (at most
    ``max_step``), or None.

    ``abstract_state``: ShapeDtypeStructs with shardings (``jax.eval_shape`` + shardings);
    the restored arrays come back sharded as they say.
    """
    steps = [s for s in self.all_steps() if max_step is None or s <= max_step]
    for step in reversed(steps):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["data"] or {})
      except Exception as e:  # noqa: BLE001 -- any failure: fall back to the previous step
        log.warning("checkpoint at step %d under %s is unreadable (%s: %s); trying the "
                    "previous one", step, self.directory, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
    if steps:
      log.warning("no readable checkpoint under %s: starting from scratch", self.directory)
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def has_checkpoint(workdir: str) -> bool:
  """Whether ``workdir/checkpoints`` holds a step directory (a run to resume)."""
  path = os.path.join(workdir, "checkpoints")
  return os.path.isdir(path) and any(d.isdigit() for d in os.listdir(path))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# --- reading weights into part of a state (pretrained init, frozen teachers) ------------------

#: The parts of a bigvl train state that together form the model's parameters: trainable
#: (``params``) and frozen (``frozen``) leaves of one tree, split by the loop.
PARAM_PARTS = ("params", "frozen")


@dataclasses.dataclass(frozen=True)
class WeightSource:
  """Weights in files to read into part of a train state after a fresh init.

  * ``path``: a bigvl run (its workdir, ``checkpoints/`` or one step directory: the newest
    step is read), a ``.safetensors`` file, or a directory of safetensors (a Hugging Face
    checkpoint: one ``model.safetensors`` or shards with ``model.safetensors.index.json``).
  * ``dst``: where they go, a ``'/'``-joined prefix of the state *view*: ``'params'`` (the
    whole model, trainable and frozen leaves alike), ``'params/img'``, ``'extra/teacher'``.
  * ``src``: the matching prefix in the file (default: ``dst``; for safetensors, a key
    prefix, default none). Below the prefixes the leaf paths are the same, unless
    ``key_fn(rel_path)`` says otherwise (a public checkpoint's naming). For safetensors it
    may return a list of keys: the leaf is then their stack on axis 0 (``nn.scan``-stacked
    layers: one tensor per layer), or None: the leaf is not in the file and keeps its init
    (e.g. LoRA adapters).
  * ``convert(rel_path, array) -> array``: a per-tensor conversion (a transpose, a reshape
    -- per layer for stacked leaves), applied to the host array before it is placed
    (safetensors only). Shapes are checked after it; it is also called once on a
    zero-strided stand-in of each tensor to learn the converted shape, so it should only
    rearrange (views) there.
  * ``what``: where it came from, for error messages (``'config.init_from.lm'``).
  """

  path: str
  dst: str = "params"
  src: str | None = None
  key_fn: Callable[[str], str | list[str] | None] | None = None
  #: regex (``re.search``) over paths below ``dst`` that keep their fresh init (parameters
  #: the file cannot have: new LoRA adapters, soft prompts).
  keep_init: str | None = None
  convert: Callable[[str, np.ndarray], np.ndarray] | None = None
  what: str = "weights"

  @property
  def is_safetensors(self) -> bool:
    from bigvl.convert import safetensors_io

    return self.path.endswith(".safetensors") or safetensors_io.holds_safetensors(self.path)


def is_hf_checkpoint(path: str) -> bool:
  """Whether ``path`` is a Hugging Face checkpoint directory: ``config.json`` + safetensors (a
  bigvl workdir has a config.json too, but no safetensors next to it)."""
  from bigvl.convert import safetensors_io

  path = os.path.expanduser(path)
  return (os.path.isfile(os.path.join(path, "config.json"))
          and safetensors_io.holds_safetensors(path))


def weight_sources(path: str, dst: str, *, src: str | None = None,
                   keep_init: str | None = None, what: str = "weights") -> list[WeightSource]:
  """The :class:`WeightSource` s of the weights at ``path``: a bigvl run or a ``.safetensors``
  file (one source), or a Hugging Face checkpoint directory (``config.json`` + safetensors:
  ``bigvl.convert.weight_sources`` maps its names and layouts; ``src`` must be None). Only a
  Hugging Face directory's ``config.json`` is read here; the weights are read (and checked)
  when a run starts fresh, never on resume."""
  from bigvl.config import ConfigError

  path = os.path.expanduser(path)
  if is_hf_checkpoint(path):
    from bigvl import convert

    if src is not None:
      raise ConfigError(f"{what}: src={src!r}: not used for a Hugging Face checkpoint "
                        f"({path}); its names come from its config.json model_type")
    return list(convert.weight_sources(path, dst, what=what))
  return [WeightSource(path=path, dst=dst, src=src, what=what, keep_init=keep_init)]


def step_dir(path: str, what: str = "checkpoint") -> str:
  """The newest step directory of a bigvl checkpoint: ``path`` may be a workdir, its
  ``checkpoints`` directory or one step directory (holding ``state``). ConfigError if none."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "state")):
    return path
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []
  if not steps:
    raise ConfigError(f"{what}={path!r} holds no bigvl checkpoint (a workdir, its "
                      f"checkpoints/ directory or a step directory)")
  return os.path.join(path, str(steps[-1]))


def view_path(path: str) -> str:
  """A state path -> its path in the state view: ``frozen/x`` and ``params/x`` are both
  ``params/x``."""
  head, _, rest = path.partition("/")
  return f"params/{rest}" if head in PARAM_PARTS else path


def _flat(tree: Any) -> dict[str, Any]:
  from bigvl.parallel import path_str

  return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _nest(flat: dict[str, Any]) -> dict:
  out: dict = {}
  for path, x in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def _bigvl_leaves(directory: str, what: str) -> dict[str, Any]:
  """``{stored state path: metadata}`` of a bigvl step directory's ``state`` item."""
  try:
    meta = ocp.PyTreeCheckpointer().metadata(os.path.join(directory, "state"))
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    return _flat(meta)
  except Exception as e:  # noqa: BLE001 -- unreadable or not a bigvl state
    raise ConfigError(f"{what}: cannot read {directory}: {type(e).__name__}: "
                      f"{str(e)[:200]}") from None


class _Plan:
  """Which file entries fill which target leaf: ``{target rel path: file key or [keys]}``
  (leaves whose ``key_fn`` gives None are left out)."""

  def __init__(self, source: WeightSource, targets: dict[str, Any]):
    self.source = source
    if source.is_safetensors:
      from bigvl.convert import safetensors_io

      if not os.path.exists(source.path):
        raise ConfigError(f"{source.what}: no such file {source.path!r}")
      try:
        self.files = safetensors_io.key_files(source.path)
        with safetensors_io.TensorReader(self.files) as reader:
          self.available = reader.shapes()
      except ConfigError as e:
        raise ConfigError(f"{source.what}: {e}") from None
      prefix = f"{source.src}." if source.src else ""
      default_key = lambda rel: prefix + rel.replace("/", ".")
    else:
      self.directory = step_dir(source.path, source.what)
      stored = _bigvl_leaves(self.directory, source.what)
      self.stored_at = {view_path(p): p for p in stored}  # view path -> stored path
      self.available = {view_path(p): tuple(getattr(m, "shape", ()))
                        for p, m in stored.items()}
      src = source.src or source.dst
      default_key = lambda rel: f"{src}/{rel}" if rel else src
    key_fn = source.key_fn or default_key
    keep = re.compile(source.keep_init) if source.keep_init else None
    self.keys = {rel: key for rel in targets
                 if not (keep and keep.search(rel)) and (key := key_fn(rel)) is not None}
    if not source.is_safetensors and any(isinstance(k, list) for k in self.keys.values()):
      raise ConfigError(f"{source.what}: stacked keys (lists) are for safetensors only")
    for rel, key in self.keys.items():
      want = tuple(targets[rel].shape)
      if isinstance(key, list):
        if len(key) != (want[0] if want else -1):
          raise ConfigError(f"{source.what}: {len(key)} tensors stacked for "
                            f"{source.dst}/{rel}, whose shape is {want} in this model")
        for i, k in enumerate(key):
          self._check(k, rel, want[1:], f"layer {i} of {source.dst}/{rel} {want}")
      else:
        self._check(key, rel, want, f"{source.dst}/{rel}")

  def _check(self, key: str, rel: str, want: tuple[int, ...], target: str) -> None:
    """ConfigError unless the file has ``key`` of shape ``want`` (after ``convert``) for
    ``target`` (the leaf, or one layer of it, in words)."""
    source = self.source
    if key not in self.available:
      close = difflib.get_close_matches(key, list(self.available), n=1)
      hint = f" (closest: {close[0]!r})" if close else ""
      raise ConfigError(f"{source.what}: {source.path} has no {key!r} for {target}{hint}")
    got = self.available[key]
    if source.is_safetensors and source.convert is not None:
      try:
        got = tuple(source.convert(rel, np.broadcast_to(np.zeros((), np.float32), got)).shape)
      except Exception as e:  # noqa: BLE001 -- a conversion that does not fit the shape
        raise ConfigError(f"{source.what}: {key!r} of shape {self.available[key]} in "
                          f"{source.path} cannot be converted for {target} "
                          f"({type(e).__name__}: {e})") from None
      if got != want:
        raise ConfigError(f"{source.what}: {key!r} is {self.available[key]} in "
                          f"{source.path} (converted: {got}) but {target} is {want} in "
                          f"this model")
    if got != want:
      raise ConfigError(f"{source.what}: {key!r} is {got} in {source.path} "
                        f"but {target} is {want} in this model")


def check_weights(source: WeightSource, targets: dict[str, Any]) -> None:
  """ConfigError unless ``source`` holds every target (``{rel path: shaped}``) with its
  shape. Reads metadata only."""
  _Plan(source, targets)


def read_weights(source: WeightSource, targets: dict[str, jax.ShapeDtypeStruct]
                 ) -> dict[str, jax.Array]:
  """Reads ``targets`` (``{rel path below source.dst: ShapeDtypeStruct with a sharding}``)
  from ``source``, each array straight into its shards: orbax partial restore for bigvl
  checkpoints (nothing else of that state is read), per-shard slices of the memory-mapped
  file for safetensors. Returns ``{rel path: jax.Array}`` with the targets' dtypes (leaves
  whose ``key_fn`` gives None are left out).

  A stacked leaf (``key_fn`` gives a list) is read inside each shard's callback, one layer
  tensor at a time and only the layers and the slice that shard holds: host memory peaks at
  about one layer's tensor (with ``convert``; its slice without), never the whole leaf."""
  plan = _Plan(source, targets)
  if source.is_safetensors:
    from bigvl.convert.safetensors_io import TensorReader

    with TensorReader(plan.files) as reader:
      return {rel: jax.make_array_from_callback(
                  targets[rel].shape, targets[rel].sharding,
                  _fetcher(reader, source, rel, key, targets[rel].dtype))
              for rel, key in plan.keys.items()}
  stored = {plan.stored_at[key]: (rel, targets[rel]) for rel, key in plan.keys.items()}
  item = _nest({p: jax.ShapeDtypeStruct(t.shape, t.dtype) for p, (_, t) in stored.items()})
  restore = _nest({p: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape,
                                           dtype=t.dtype) for p, (_, t) in stored.items()})
  args = ocp.args.PyTreeRestore(item=item, restore_args=restore, partial_restore=True)
  got = _flat(ocp.PyTreeCheckpointer().restore(os.path.join(plan.directory, "state"),
                                               args=args))
  return {rel: got[p] for p, (rel, _) in stored.items()}


def _fetcher(reader: Any, source: WeightSource, rel: str, key: str | list[str], dtype: Any
             ) -> Callable[[tuple], np.ndarray]:
  """The ``jax.make_array_from_callback`` callback of one safetensors leaf: ``index`` (a
  tuple of slices of the target) -> that part of the (converted, stacked) file data."""
  convert = source.convert
  if isinstance(key, list):
    def fetch_stacked(index: tuple) -> np.ndarray:
      index = tuple(index)
      layer_index, rest = (index[0], index[1:]) if index else (slice(None), ())
      parts = []
      for k in key[layer_index]:  # only the layers this shard holds, one at a time
        if convert is None:
          parts.append(np.asarray(reader.slice(k, rest), dtype=dtype))
        else:
          parts.append(np.asarray(convert(rel, reader.get(k))[rest], dtype=dtype))
      return np.stack(parts)
    return fetch_stacked
  if convert is None:
    return lambda index: np.asarray(reader.slice(key, tuple(index)), dtype=dtype)
  full: list[np.ndarray] = []  # read and converted on first use, shared by the leaf's shards

  def fetch(index: tuple) -> np.ndarray:
    if not full:
      full.append(np.asarray(convert(rel, reader.get(key)), dtype=dtype))
    return full[0][tuple(index)]
  return fetch
