"""Strict config reading: every key a run never reads is an error, every bad value exits 2.

Components receive a :class:`Reader` over their part of the experiment's ``ConfigDict`` and
read it in their constructors, before anything compiles. After construction the trainer asks
the root reader which keys were never read: a typo (``config.optim.lerning_rate``) fails the
run with one line instead of silently falling back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import ml_collections

_MISSING = object()


class ConfigError(ValueError):
  """A bad experiment config. ``bigvl.main`` prints it as one line and exits with status 2."""


class Reader:
  """A read-tracking, read-only view of a (nested) ``ConfigDict``.

  ``r.name`` / ``r['name']`` read a required key, ``r.get(name, default)`` an optional one,
  ``r.typed(name, types, default)`` one with a checked type. Sub-dicts come back as Readers
  that share the same record of what was read.
  """

  def __init__(self, cfg: ml_collections.ConfigDict | dict, path: str = "config",
               seen: set[str] | None = None):
    object.__setattr__(self, "_cfg", cfg)
    object.__setattr__(self, "_path", path)
    object.__setattr__(self, "_seen", set() if seen is None else seen)

  # --- reading -------------------------------------------------------------------------
  def _wrap(self, name: str, value: Any) -> Any:
    key = f"{self._path}.{name}"
    self._seen.add(key)
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      return Reader(value, key, self._seen)
    return value

  def __getattr__(self, name: str) -> Any:
    if name.startswith("__"):
      raise AttributeError(name)
    if name not in self._cfg:
      raise ConfigError(f"{self._path}.{name} is required but missing")
    return self._wrap(name, self._cfg[name])

  __getitem__ = __getattr__

  def __setattr__(self, name: str, value: Any) -> None:
    raise TypeError("config Readers are read-only")

  def get(self, name: str, default: Any = None) -> Any:
    if name not in self._cfg:
      return default
    value = self._cfg[name]
    if value is None:
      self._seen.add(f"{self._path}.{name}")
      return default
    return self._wrap(name, value)

  def typed(self, name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    """Reads ``name`` and checks ``isinstance(value, types)`` (bool is never an int here)."""
    if default is _MISSING:
      value = self.__getattr__(name)
    else:
      value = self.get(name, default)
    types = types if isinstance(types, tuple) else (types,)
    bad_bool = isinstance(value, bool) and bool not in types
    if value is not None and (bad_bool or not isinstance(value, types)):
      want = "/".join(t.__name__ for t in types)
      raise ConfigError(f"{self._path}.{name} must be {want}, got {value!r}")
    return value

  def __contains__(self, name: str) -> bool:
    return name in self._cfg and self._cfg[name] is not None

  def keys(self) -> list[str]:
    return list(self._cfg.keys())

  def items(self) -> Iterator[tuple[str, Any]]:
    for name in list(self._cfg.keys()):
      yield name, self._wrap(name, self._cfg[name])

  def mark_read(self, *names: str) -> None:
    """Marks keys as read by a part of the run that consumes them elsewhere (e.g. main)."""
    for name in names:
      self._seen.add(f"{self._path}.{name}")

  @property
  def path(self) -> str:
    return self._path

  def to_dict(self) -> dict[str, Any]:
    """The raw values below this node (marks everything below as read)."""
    out = {}
    for name, value in self.items():
      out[name] = value.to_dict() if isinstance(value, Reader) else value
    return out

  # --- auditing --------------------------------------------------------------------------
  def unread(self) -> list[str]:
    """Leaf keys below this node that nothing read."""
    missing = []

    def walk(cfg: Any, path: str) -> None:
      for name in cfg.keys():
        key = f"{path}.{name}"
        value = cfg[name]
        if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
          if key in self._seen:
            walk(value, key)
          else:
            missing.append(key)
        elif key not in self._seen:
          missing.append(key)

    walk(self._cfg, self._path)
    return missing

  def check_all_read(self) -> None:
    missing = self.unread()
    if missing:
      raise ConfigError(f"config keys that nothing in this run reads (typo?): {', '.join(missing)}")


def check_choice(path: str, value: Any, choices: tuple | list) -> Any:
  if value not in choices:
    raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}")
  return value


def positive_int(r: Reader, name: str, default: Any = _MISSING) -> int:
  value = r.typed(name, int, default)
  if value is not None and value <= 0:
    raise ConfigError(f"{r.path}.{name} must be > 0, got {value}")
  return value


def read_knobs(r: Reader | None, defaults: dict[str, Any], where: str) -> dict[str, Any]:
  """A method's knob section (``config.da``, ``config.cct`` ...) over ``defaults``: a key not
  in ``defaults`` is a ConfigError listing the knobs; each value must have its default's type
  (a float knob takes an int, a tuple/list knob a tuple or list, a dict knob a dict whose
  keys it then may not extend). Ranges are the caller's to check."""
  out = dict(defaults)
  if r is None:
    return out
  unknown = sorted(set(r.keys()) - set(defaults))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]} is not a knob; knobs: {', '.join(defaults)}")
  for name, default in defaults.items():
    if isinstance(default, dict):
      sub = r.get(name)
      out[name] = dict(default) if sub is None else {
          **default, **read_knobs(sub, default, f"{where}.{name}")}
      continue
    if isinstance(default, float):
      kind: Any = (float, int)
    elif isinstance(default, (tuple, list)):
      kind = (tuple, list)
    else:
      kind = type(default)
    value = r.typed(name, kind, default)
    out[name] = (float(value) if isinstance(default, float) else
                 tuple(value) if isinstance(default, (tuple, list)) else value)
  return out


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """``'tiny,res=64'`` -> ``{'tiny': True, 'res': 64}`` over ``defaults`` (big_vision style).

  A bare word is a boolean switch; ``k=v`` takes v's type from the default. An unknown key or
  a value of the wrong type is a :class:`ConfigError` saying which.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in out:
      raise ConfigError(f"unknown config arg {key!r}; known: {', '.join(out.keys())}")
    kind = type(defaults[key])
    if not eq:
      if kind is not bool:
        raise ConfigError(f"config arg {key!r} needs a value ({key}=<{kind.__name__}>)")
      out[key] = True
    elif kind is bool:
      if value.lower() not in _BOOLS:
        raise ConfigError(f"config arg {key}={value!r} must be bool (true/false, 1/0, yes/no)")
      out[key] = _BOOLS[value.lower()]
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"config arg {key}={value!r} must be {kind.__name__}") from None
  return out


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _import_file(path: str, module_name: str) -> Any:
  import importlib.util

  spec = importlib.util.spec_from_file_location(module_name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _where(e: BaseException, path: str) -> str:
  """``' (file:line)'`` of the innermost traceback frame in ``path`` (where a config broke)."""
  import traceback

  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f" ({path}:{frames[-1].lineno})" if frames else ""


#: ``config.runtime``: how the loop runs, never what it computes (every setting trains the
#: same numbers). ``async_checkpoint``: orbax writes checkpoints in a background thread while
#: training goes on; ``donate``: the train step reuses the old state's buffers for the new
#: one (about one state's worth of memory less); ``profile_start``/``profile_steps``: a
#: ``jax.profiler`` trace of that many steps from that step into ``<workdir>/profile``
#: (TensorBoard's profile tab, xprof or Perfetto read it); ``kill -USR1 <pid>`` traces the
#: next ``profile_steps`` (3 if unset) steps of a running job; ``host_heap``: ``'auto'`` /
#: ``'retain'`` / ``'system'``, whether a CPU run's process keeps XLA's per-step scratch
#: memory mapped between steps (:mod:`bigvl.heap`; read by the entry points, before jax starts).
RUNTIME_DEFAULTS = {"async_checkpoint": True, "donate": True, "profile_start": 0,
                    "profile_steps": 0, "host_heap": "auto"}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """``'configs/x.py:arg'`` -> ``get_config(arg)`` of that file (``get_config()`` if no arg).

  Every failure -- no such file, a file that does not import, no ``get_config``, a bad arg,
  an exception in ``get_config`` -- is a one-line :class:`ConfigError`.
  """
  path, colon, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config {path}: no such file")
  try:
    mod = _import_file(path, "bigvl_config")
  except Exception as e:  # noqa: BLE001 -- a config file that does not import
    raise ConfigError(f"--config {path} does not load: {type(e).__name__}: "
                      f"{_first_line(e)}{_where(e, path)}") from None
  if not callable(getattr(mod, "get_config", None)):
    raise ConfigError(f"--config {path} defines no get_config(arg)")
  try:
    config = mod.get_config(arg) if colon else mod.get_config()
  except ConfigError as e:
    raise ConfigError(f"--config {spec}: {e}") from None
  except Exception as e:  # noqa: BLE001 -- a config whose get_config fails
    raise ConfigError(f"--config {spec}: get_config raised {type(e).__name__}: "
                      f"{_first_line(e)}{_where(e, path)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config {spec}: get_config returned {type(config).__name__}, "
                      "not a ConfigDict")
  if "runtime" not in config:  # every experiment has the loop's knobs, to override
    config.runtime = ml_collections.ConfigDict(RUNTIME_DEFAULTS)
  return config


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else repr(e)


def flat_keys(cfg: ml_collections.ConfigDict | dict, prefix: str = "") -> list[str]:
  """Every key path of a nested config, sub-dicts included: ``['a', 'a.b', ...]``."""
  out = []
  for name in cfg.keys():
    key = f"{prefix}{name}"
    out.append(key)
    if isinstance(cfg[name], (ml_collections.ConfigDict, dict)):
      out.extend(flat_keys(cfg[name], key + "."))
  return out


def check_override(cfg: ml_collections.ConfigDict, key: str) -> None:
  """Raises ``ConfigError('unknown config key config.<key> (did you mean ...?)')`` unless
  ``key`` (``'optim.lr'``) names an entry of ``cfg``. Suggestions: difflib's close matches
  among all key paths, else among their last parts, else the keys of ``key``'s parent."""
  import difflib

  keys = flat_keys(cfg)
  if key in keys:
    return
  parents = {k.rpartition(".")[0] for k in keys}
  leaves = [k for k in keys if k not in parents]
  close = difflib.get_close_matches(key, leaves, n=3, cutoff=0.6)
  if not close:  # a typo in the last part of a long path: compare the last parts
    last = lambda k: k.rpartition(".")[2]
    near = difflib.get_close_matches(last(key), sorted({last(k) for k in leaves}), cutoff=0.6)
    close = [k for k in leaves if last(k) in near][:3]
  parent = key.rpartition(".")[0]
  siblings = [k.rpartition(".")[2] for k in keys if parent and k.rpartition(".")[0] == parent]
  if close:
    hint = f"did you mean {' or '.join(f'config.{k}' for k in close)}?"
  elif siblings:
    hint = f"config.{parent} has: {', '.join(siblings)}"
  else:
    hint = "no similar key in the config"
  raise ConfigError(f"unknown config key config.{key} ({hint})")


def load_sibling(config_file: str, name: str) -> Any:
  """Imports ``configs/<name>.py`` next to ``config_file`` (configs are not a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  return _import_file(path, f"bigvl_configs_{name}")
