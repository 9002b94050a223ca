"""Reading and writing Hugging Face checkpoint directories in safetensors (never pickles).

A directory holds ``config.json`` and either one ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed by ``model.safetensors.index.json``
(``{"weight_map": {tensor key: shard file}}``). :func:`key_files` maps every tensor key to
its file; :class:`TensorReader` reads tensors (or slices of them) lazily, one at a time,
from the memory-mapped files; :func:`save` writes a directory the same way.

bfloat16: numpy has no native bfloat16. ``safe_open(framework='numpy')`` (safetensors >=
0.4) returns ``ml_dtypes.bfloat16`` arrays; :func:`as_numpy` also reinterprets the raw 2-byte
form older versions gave, so callers always get a proper ``ml_dtypes.bfloat16`` array whose
``astype(np.float32)`` is exact.

Every problem with a directory is a :class:`bigvl.config.ConfigError` naming it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from bigvl.config import ConfigError

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
#: files that mean "a pickled checkpoint": refused (unpickling runs arbitrary code).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def read_config(directory: str) -> dict:
  """``directory/config.json`` as a dict; ConfigError when absent or not JSON."""
  path = os.path.join(directory, CONFIG)
  if not os.path.isdir(directory):
    raise ConfigError(f"{directory!r} is not a directory (expected a Hugging Face "
                      f"checkpoint directory with {CONFIG} and *.safetensors)")
  if not os.path.isfile(path):
    raise ConfigError(f"{directory!r} has no {CONFIG}: not a Hugging Face checkpoint "
                      f"directory")
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"cannot read {path}: {e}") from None
  if not isinstance(cfg, dict):
    raise ConfigError(f"{path} is not a JSON object")
  return cfg


def holds_safetensors(path: str) -> bool:
  """Whether ``path`` is a directory with a safetensors index or any ``*.safetensors``."""
  return os.path.isdir(path) and (os.path.isfile(os.path.join(path, INDEX)) or
                                  bool(glob.glob(os.path.join(path, "*.safetensors"))))


def key_files(path: str) -> dict[str, str]:
  """``{tensor key: absolute file}`` of a ``.safetensors`` file or a checkpoint directory.

  A directory: its ``model.safetensors.index.json`` when present (every shard it names must
  exist), else every ``*.safetensors`` file in it (keys read from their headers). ConfigError
  when there are none -- a directory of pickled ``.bin`` weights included: those are refused.
  """
  from safetensors import safe_open

  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    files = [path]
  elif os.path.isfile(os.path.join(path, INDEX)):
    try:
      with open(os.path.join(path, INDEX)) as f:
        weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(f"cannot read {os.path.join(path, INDEX)}: {type(e).__name__}: "
                        f"{e}") from None
    out = {k: os.path.join(path, v) for k, v in weight_map.items()}
    missing = sorted({f for f in out.values() if not os.path.isfile(f)})
    if missing:
      raise ConfigError(f"{path}: {INDEX} names shard files that are missing: "
                        f"{[os.path.basename(f) for f in missing]}")
    return out
  elif os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
      pickles = sorted(os.path.basename(f) for p in PICKLE_PATTERNS
                       for f in glob.glob(os.path.join(path, p)))
      found = f" (found {pickles[:4]})" if pickles else ""
      raise ConfigError(
          f"{path} holds no *.safetensors weights{found}. Pickled checkpoints (.bin, .pt, "
          f".pth) are refused: unpickling runs arbitrary code. Convert once, somewhere you "
          f"trust the file: `AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
          f"safe_serialization=True)` in transformers (or the hub's safetensors convert "
          f"space)")
  else:
    raise ConfigError(f"no such file or directory {path!r}")
  out = {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        out.update({k: file for k in f.keys()})
    except Exception as e:  # noqa: BLE001 -- a corrupt or non-safetensors file
      raise ConfigError(f"cannot read {file}: {type(e).__name__}: {str(e)[:200]}") from None
  return out


def as_numpy(x: Any) -> np.ndarray:
  """A tensor from ``safe_open(framework='numpy')`` as a numpy array; bfloat16 always as
  ``ml_dtypes.bfloat16`` (raw 2-byte void/uint16 forms are reinterpreted, not converted)."""
  x = np.asarray(x)
  if x.dtype.kind == "V" and x.dtype.itemsize == 2:
    x = x.view(ml_dtypes.bfloat16)
  return x


class TensorReader:
  """Lazy reads from ``{key: file}`` (:func:`key_files`): each file is opened (memory-mapped)
  on first use and kept open until :meth:`close` / the end of a ``with`` block; a tensor is
  read only when asked for, and :meth:`slice` reads only the asked-for part of it."""

  def __init__(self, files: dict[str, str]):
    self.files = files
    self._stack = contextlib.ExitStack()
    self._open: dict[str, Any] = {}

  def __enter__(self) -> TensorReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._stack.close()
    self._open.clear()

  def _handle(self, key: str) -> Any:
    from safetensors import safe_open

    if key not in self.files:
      raise ConfigError(f"no tensor {key!r} in {sorted(set(self.files.values()))}")
    file = self.files[key]
    if file not in self._open:
      self._open[file] = self._stack.enter_context(safe_open(file, framework="numpy"))
    return self._open[file]

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(key).get_slice(key).get_shape())

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of every tensor (headers only)."""
    return {k: self.shape(k) for k in self.files}

  def get(self, key: str) -> np.ndarray:
    """The whole tensor."""
    return as_numpy(self._handle(key).get_tensor(key))

  def slice(self, key: str, index: tuple) -> np.ndarray:
    """``tensor[index]`` (a tuple of slices, as ``jax.make_array_from_callback`` gives),
    reading only that part of the file."""
    if not index:  # a scalar, or the whole tensor
      return self.get(key)
    return as_numpy(self._handle(key).get_slice(key)[tuple(index)])


def save(directory: str, tensors: dict[str, np.ndarray], config: dict | None = None,
         max_shard_bytes: int | None = None) -> None:
  """Writes ``tensors`` (and ``config`` as ``config.json``) into ``directory``: one
  ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` of at most
  ``max_shard_bytes`` each (a tensor is never split) plus ``model.safetensors.index.json``."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  if config is not None:
    with open(os.path.join(directory, CONFIG), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  metadata = {"format": "pt"}  # what transformers' loader expects of safetensors files
  sizes = {k: v.nbytes for k, v in tensors.items()}
  if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
    save_file(tensors, os.path.join(directory, SINGLE), metadata=metadata)
    return
  shards: list[list[str]] = [[]]
  used = 0
  for k in tensors:
    if shards[-1] and used + sizes[k] > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(k)
    used += sizes[k]
  n = len(shards)
  weight_map = {}
  for i, keys in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    save_file({k: tensors[k] for k in keys}, os.path.join(directory, name), metadata=metadata)
    weight_map.update({k: name for k in keys})
  index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
