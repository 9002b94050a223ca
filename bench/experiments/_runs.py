"""Shared by the experiment scripts: which code and which command made a run, so a kept
workdir is reused only for exactly that run.

A run's key is its full command line (config, arg, every override, seed) plus the code
version: the commit and a hash of any uncommitted change under ``bigvl/`` and ``configs/``.
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
  """``<commit>`` or ``<commit>+<hash of the uncommitted diff of bigvl/ and configs/>``."""
  def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
  commit = git("rev-parse", "--short=12", "HEAD").strip()
  diff = git("diff", "HEAD", "--", "bigvl", "configs")
  untracked = git("ls-files", "--others", "--exclude-standard", "bigvl", "configs")
  if not diff and not untracked:
    return commit
  h = hashlib.sha256(diff.encode())
  for path in sorted(untracked.split()):
    with open(os.path.join(REPO, path), "rb") as f:
      h.update(path.encode() + f.read())
  return f"{commit}+{h.hexdigest()[:12]}"


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
