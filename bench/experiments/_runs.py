"""Shared by the experiment scripts: which code and which command made a run, so a kept
workdir is reused only for exactly that run.

A run's key is its full command line (config, arg, every override, seed) plus the code
version: a hash of the contents of ``bigvl/`` and ``configs/``.
``--workdir`` runs store the key in ``run_key.json``; a workdir whose key differs (other
overrides, other code) is never reused: it is cleared and the run starts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def code_version() -> str:
  """A hash of the code a run executes: the contents of ``bigvl/`` and ``configs/`` as they
  are in the working tree (tracked files with uncommitted changes and untracked files
  included), so commits that touch only docs or bench scripts keep finished runs valid."""
  files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                          "bigvl", "configs"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
  h = hashlib.sha256()
  for path in sorted(set(files)):
    full = os.path.join(REPO, path)
    if os.path.isfile(full):
      with open(full, "rb") as f:
        h.update(path.encode() + b"\0" + f.read() + b"\0")
  return f"code-{h.hexdigest()[:12]}"


def prepare_workdir(workdir: str, cmd: list[str], code: str) -> bool:
  """True if ``workdir`` already holds the finished run of ``cmd`` with ``code`` (reuse it).
  A workdir of another command or code version is cleared; an unfinished run of the same
  key is left to resume."""
  key = {"cmd": cmd, "code": code}
  path = os.path.join(workdir, "run_key.json")
  if os.path.exists(path):
    with open(path) as f:
      if json.load(f) == key:
        return os.path.exists(os.path.join(workdir, "results.json"))
  if os.path.exists(workdir):
    print(f"clearing {workdir}: it holds another command or code version", flush=True)
    shutil.rmtree(workdir)
  os.makedirs(workdir)
  with open(path, "w") as f:
    json.dump(key, f, indent=1)
  return False


def run_config(root: str, name: str, config: str, seed: int, code: str,
               extra: list[str] = ()) -> dict:
  """``python -m bigvl.main --config configs/<config> --workdir <root>/<name>_seed<seed>
  --config.seed=<seed> <extra>`` unless that exact run already finished with this code (then
  reused): its ``results.json``."""
  import sys

  workdir = os.path.join(root, f"{name}_seed{seed}")
  cmd = ["-m", "bigvl.main", "--config", f"configs/{config}", "--workdir", workdir,
         f"--config.seed={seed}", *extra]
  if not prepare_workdir(workdir, cmd, code):
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def arm_sweep_args(name: str, arms: bool = True):
  """The arguments of an experiment script that runs arms x seeds of one config:
  ``--data_dir`` (required), ``--seeds`` (0 1 2), ``--arms`` (a subset of the arms' args),
  ``--root`` (``/tmp/bigvl/<name>``), ``--out`` (``docs/results/<name>.md``), ``--extra``
  (``--extra=--config.key=value``, repeatable: an override for every run). Returns the
  parser, for more arguments."""
  import argparse

  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  if arms:
    ap.add_argument("--arms", nargs="*", default=None, help="a subset of the arms' args")
  ap.add_argument("--root", default=f"/tmp/bigvl/{name}")
  ap.add_argument("--out", default=os.path.join(REPO, f"docs/results/{name}.md"))
  ap.add_argument("--extra", action="append", default=[],
                  help="--extra=--config.key=value (repeatable): an override for every run")
  return ap


def extra_flags(extra: list[str]) -> str:
  """The ``--extra=...`` flags as a command line writes them (for the tables' commands)."""
  return "".join(f" --extra={e}" for e in extra)


def load_finished(workdir: str):
  """``(run, step, state)`` of a finished run from its ``config.json`` and latest checkpoint
  (nothing is trained); exits with a message if it has no checkpoint."""
  import sys

  import ml_collections

  sys.path.insert(0, REPO)
  from bigvl import checkpoint, parallel, train

  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  run = train.build(config)
  batch = parallel.global_batch(next(run.task.train_data(run.seed)), run.mesh)
  fns = train.compile_run(run, batch)
  restored = checkpoint.Checkpointer(workdir).restore_latest(fns.abstract_state)
  if restored is None:
    sys.exit(f"{workdir}: no checkpoint")
  return (run, *restored[:2])
