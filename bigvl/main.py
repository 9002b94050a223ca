"""``python -m bigvl.main --config configs/x.py:arg --workdir W [--config.key=value ...]``.

A bad command line or config -- a missing config file, a bad ``:arg``, an unknown override
key, an unknown or unread key, a wrong type, an unknown dataset/model/loss/task name, a batch
the mesh's data axes do not divide -- prints one line and exits with status 2 before anything
compiles.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import NoReturn

BAD_CONFIG = 2
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")
_OVERRIDE_FLAG = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _fail(msg: str) -> NoReturn:
  print(f"bigvl: bad config: {msg}", file=sys.stderr, flush=True)
  sys.exit(BAD_CONFIG)


def _take_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
  """``(X, argv without it)`` for ``--config X`` / ``--config=X`` (the last one given)."""
  spec, rest, i = None, [], 0
  while i < len(argv):
    m = _CONFIG_FLAG.match(argv[i])
    if m and m.group(1) == "=":
      spec = argv[i].split("=", 1)[1]
    elif m:
      if i + 1 == len(argv):
        _fail("--config needs a value: --config configs/<experiment>.py[:arg]")
      spec, i = argv[i + 1], i + 1
    else:
      rest.append(argv[i])
    i += 1
  return spec, rest


def _parse(argv: list[str], need_workdir: bool = True, extra_flags=None):
  """The flags of ``argv`` (``argv[0]`` is the program) with the config loaded and overridden;
  any problem -> :func:`_fail`. Also used by ``bigvl.prompt_selection`` (no workdir) and
  ``bigvl.eval`` (``extra_flags(flags, flag_values)`` defines its own flags)."""
  from absl import flags
  from ml_collections import config_flags

  from bigvl.config import ConfigError, check_override, load_config

  spec, rest = _take_config_flag(argv)
  if not spec:
    _fail("--config is required: --config configs/<experiment>.py[:arg]")
  try:
    config = load_config(spec)
    for arg in rest[1:]:
      m = _OVERRIDE_FLAG.match(arg)
      if m:
        check_override(config, m.group(1))
    fv = flags.FlagValues()
    config_flags.DEFINE_config_dict("config", config, f"the config of {spec}", flag_values=fv,
                                    lock_config=True, sys_argv=rest)
    flags.DEFINE_string("workdir", None, "where checkpoints, metrics and events go",
                        flag_values=fv)
    flags.DEFINE_string("log_level", "WARNING", "python logging level", flag_values=fv)
    if extra_flags is not None:
      extra_flags(flags, fv)
    extra = fv(rest)[1:]
  except ConfigError as e:
    _fail(str(e))
  except flags.Error as e:
    _fail(str(e).strip().splitlines()[0])
  except Exception as e:  # noqa: BLE001 -- an override config_flags cannot apply
    _fail(f"{type(e).__name__}: {' '.join(str(e).split())}")
  if extra:
    _fail(f"unexpected arguments: {' '.join(extra)}")
  if need_workdir and not fv.workdir:
    _fail("--workdir is required")
  return fv


def quiet_logging(level: str) -> None:
  """Python logging at ``level``; absl, jax's backend probe, TensorFlow and orbax at ERROR."""
  logging.basicConfig(level=getattr(logging, level.upper(), logging.WARNING),
                      format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src.xla_bridge", "tensorflow", "orbax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)


def ensure_host_heap(config, argv: list[str] | None) -> None:
  """``config.runtime.host_heap`` (:mod:`bigvl.heap`) for a command run as its own process
  (``argv is None``): may re-execute the command line; a bad value exits 2. A caller passing
  ``argv`` (a test, a notebook) keeps its process as it is."""
  if argv is not None:
    return
  from bigvl import heap

  try:
    heap.ensure(config.runtime.get("host_heap", "auto"))
  except ValueError as e:
    _fail(str(e))


def main(argv: list[str] | None = None) -> None:
  fv = _parse(list(sys.argv if argv is None else argv))
  ensure_host_heap(fv.config, argv)
  quiet_logging(fv.log_level)

  from bigvl import parallel, train
  from bigvl.config import ConfigError

  parallel.initialize_distributed()
  try:
    run = train.build(fv.config)
    if run.tool is not None:  # config.tool: e.g. CLIP-DPO's candidate generation
      run.tool.run(run, fv.workdir)
      return
    # A fresh run checks its pretrained weights (files, keys, shapes) before compiling.
    train.train(fv.config, fv.workdir, run=run)
  except ConfigError as e:
    _fail(str(e))


if __name__ == "__main__":
  main()
