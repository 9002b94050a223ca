"""Prepare datasets ahead of a run and list what a data dir holds.

  python -m bigvl.data.prepare [NAME ...] [--data_dir D]

``NAME`` is a dataset as ``config.input.dataset`` names it (``shapes_captions``,
``shapes_segmentation/small``, ``shapes_fewshot/shifted``, any TFDS name). bigvl's own
synthetic builders (``bigvl/data/builders/``) are generated here, deterministically and
offline, as ArrayRecord; a run would otherwise prepare them on first use. A public TFDS
dataset is only checked: prepare it with ``tfds build NAME --data_dir D
--file_format=array_record`` on a machine that can download it (or from manually downloaded
files), then copy ``D/NAME`` over. With no name, every config of every bigvl builder is
listed. ``--data_dir``: default ``$BIGVL_DATA``, else ``~/tensorflow_datasets`` (as a run).
Prints one line per dataset: its splits and sizes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bigvl import registry
from bigvl.config import ConfigError
from bigvl.data import sources


def own_datasets() -> list[str]:
  """``'builder/config'`` of every config of bigvl's own builders."""
  tfds = sources._quiet_tfds()
  out = []
  for base in registry.available("data.builders"):
    importlib.import_module(f"bigvl.data.builders.{base}")
    cls = tfds.builder_cls(base)
    out += [f"{base}/{c.name}" for c in cls.BUILDER_CONFIGS]
  return out


def describe(builder) -> str:
  splits = ", ".join(f"{name} {split.num_examples:,}"
                     for name, split in sorted(builder.info.splits.items()))
  return f"{builder.info.full_name}: {splits}"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m bigvl.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("names", nargs="*", help="datasets to prepare (default: list bigvl's own)")
  p.add_argument("--data_dir", default=None, help="default $BIGVL_DATA or ~/tensorflow_datasets")
  args = p.parse_args(argv)
  import logging

  logging.getLogger("absl").setLevel(logging.ERROR)  # TFDS's notes while it prepares
  root = sources.data_dir(args.data_dir)
  if not args.names:
    for name in own_datasets():
      print(name)
    return 0
  for name in args.names:
    try:
      print(describe(sources.tfds_builder(name, root)), flush=True)
    except ConfigError as e:
      print(f"bigvl: {e}", file=sys.stderr, flush=True)
      return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
