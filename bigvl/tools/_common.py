"""Shared by the tools: the model's parameters as the train loop would start them, a progress
bar, and atomic jsonl files."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import jax


def load_params(run: Any) -> Any:
  """The task's whole parameter tree after a fresh init with ``config.init_from`` (and the
  task's ``pretrained()``) read into their shards: what a training run would start from."""
  from bigvl import train

  _, example, fns = train.prepare(run)
  return train.model_params(fns.init(example))


def embedding_fns(task: Any, tool: str) -> tuple[Any, Any]:
  """The jitted ``embed_images`` / ``embed_texts`` prediction functions of a two-tower task,
  or a ConfigError naming ``tool``."""
  from bigvl.config import ConfigError

  fns = task.predict_fns()
  if "embed_images" not in fns or "embed_texts" not in fns:
    raise ConfigError(f"tool {tool} needs a two-tower task (embed_images, embed_texts), got "
                      f"{type(task).__module__}")
  return jax.jit(fns["embed_images"]), jax.jit(fns["embed_texts"])


def progress(iterable: Iterable, total: int, desc: str, unit: str = "it") -> Iterator:
  """A progress bar on stderr (process 0; tqdm), the items of ``iterable`` unchanged."""
  from tqdm import tqdm

  return iter(tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr,
                   disable=jax.process_index() != 0, dynamic_ncols=True, mininterval=1.0))


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
  """One JSON object per line, written atomically (``tmp`` then ``os.replace``): a killed
  writer leaves no partial file under ``path``."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def read_jsonl(path: str) -> tuple[list[dict], int]:
  """``(rows, number of unreadable lines)``: a line that is not a JSON object is skipped and
  counted, never fatal."""
  rows, bad = [], 0
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        bad += 1
        continue
      if isinstance(row, dict):
        rows.append(row)
      else:
        bad += 1
  return rows, bad
