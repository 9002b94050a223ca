"""``python -m bigvl.main --config configs/x.py:arg --workdir W [--config.key=value ...]``.

A bad config -- unknown or unread key, wrong type, unknown dataset/model/loss/task name,
a batch the mesh's data axes do not divide -- prints one line and exits with status 2
before anything compiles.
"""

from __future__ import annotations

import logging
import os
import sys

BAD_CONFIG = 2


def _fail(msg: str) -> None:
  print(f"bigvl: bad config: {msg}", file=sys.stderr, flush=True)
  sys.exit(BAD_CONFIG)


def main(argv: list[str] | None = None) -> None:
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]",
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints, metrics and events go",
                      flag_values=fv)
  flags.DEFINE_string("log_level", "WARNING", "python logging level", flag_values=fv)
  argv = list(sys.argv if argv is None else argv)
  try:
    fv(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])
  except Exception as e:  # noqa: BLE001 -- a config file that fails to load or parse
    _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  if fv.config is None:
    _fail("--config is required")
  if not fv.workdir:
    _fail("--workdir is required")
  logging.basicConfig(level=getattr(logging, fv.log_level.upper(), logging.WARNING),
                      format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "jax._src.xla_bridge", "tensorflow", "orbax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

  from bigvl import parallel, train
  from bigvl.config import ConfigError

  parallel.initialize_distributed()
  try:
    run = train.build(fv.config)
  except ConfigError as e:
    _fail(str(e))
  train.train(fv.config, fv.workdir, run=run)


if __name__ == "__main__":
  main()
