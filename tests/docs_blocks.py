"""Every command the docs mark runnable runs, so the docs cannot rot (the shared part of
tests/test_docs_commands.py and tests/test_docs_commands_label_efficient.py, which split the
pages between the two pytest-xdist workers).

A fenced block opened with ```` ```console runnable ```` in README.md or docs/*.md holds shell
commands (``#`` comments, ``\\`` continuations); the tests run each block as one bash script
(``set -euo pipefail``) from the repository root, with

* ``/tmp/bigvl`` replaced by a fresh directory per block (commands of a block share it: a
  block may train a model and then evaluate it),
* ``BIGVL_DATA`` pointing at one data directory for the whole file (datasets are prepared
  once, by the first command that needs them),
* ``:tiny`` settings made shorter still: every ``python -m bigvl.main`` command not setting
  its length gets ``--config.total_steps=2`` (the whole flow runs -- data, compile, steps,
  checkpoint, evaluators, plots -- not the minutes of training),
* XLA at -O1 (``tests.helpers.TEST_XLA_FLAGS``: the same programs, compiled sooner),
* after a block, each test file's ``OUTPUTS`` checks what a named training run left (its
  ``results.json``, figures): these blocks are the tiny configs' end-to-end tests.

Blocks opened with ```` ```console ```` are shown, not run: full-size runs, real datasets,
accelerators, benchmarks and experiment sweeps (each of those names the script or test that
does run it). The README's demo and the evaluation of its workdir are run in full by
tests/test_demo.py, which checks the README's command is the one it runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.helpers import REPO, subprocess_env

FENCE = re.compile(r"^```console runnable[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(
    os.path.join(REPO, "docs")) if f.endswith(".md"))
SHORT = "--config.total_steps=2"


def commands(block: str) -> list[str]:
  """The commands of a block: comment and blank lines dropped, ``\\`` lines joined."""
  out, pending = [], ""
  for line in block.splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith("#")):
      continue
    if line.rstrip().endswith("\\"):
      pending += line.rstrip()[:-1].strip() + " "
      continue
    out.append((pending + line.strip()).strip())
    pending = ""
  if pending:
    out.append(pending.strip())
  return out


def shortened(cmd: str, root: str) -> str:
  cmd = cmd.replace("/tmp/bigvl", root)
  if "python -m bigvl.main" in cmd and "total_steps" not in cmd:
    cmd += f" {SHORT}"
  return cmd


def runnable_blocks() -> list:
  params = []
  for rel in DOCS:
    text = open(os.path.join(REPO, rel)).read()
    for m in FENCE.finditer(text):
      line = text.count("\n", 0, m.start()) + 1
      params.append(pytest.param(rel, commands(m.group(1)), id=f"{rel}:{line}"))
  return params


BLOCKS = runnable_blocks()
#: pages whose blocks run in tests/test_docs_commands_label_efficient.py (the other worker)
LABEL_EFFICIENT = ("docs/semisup.md", "docs/domain_adaptation.md", "docs/segmentation.md",
                   "docs/scl.md")


def main_workdirs(cmds: list[str], root: str) -> dict[str, str]:
  """``{name: path}`` of the workdirs the block's ``python -m bigvl.main`` commands train in
  (``/tmp/bigvl/<name>`` in the docs, under ``root`` when run)."""
  out = {}
  for c in cmds:
    m = re.search(r"--workdir /tmp/bigvl/(\S+)", c)
    if "python -m bigvl.main" in c and m:
      out[m.group(1)] = os.path.join(root, m.group(1))
  return out


def results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def unused_checks(outputs: dict, in_pages) -> set[str]:
  """The names in ``outputs`` that no block of the pages ``in_pages(page)`` trains in: checks
  that would never run."""
  names = {n for p in BLOCKS if in_pages(p.values[0]) for n in main_workdirs(p.values[1], "/r")}
  return set(outputs) - names


def run_block(cmds: list[str], data_dir: str, root: str, outputs: dict | None = None) -> None:
  """Runs one block's commands as a bash script (see the module docstring), then checks what
  the training runs left: ``outputs`` maps a workdir name (``/tmp/bigvl/<name>``) to a check
  of that workdir."""
  script = "set -euo pipefail\n" + "\n".join(shortened(c, root) for c in cmds)
  res = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                       env=subprocess_env({"BIGVL_DATA": data_dir}), timeout=900)
  assert res.returncode == 0, (f"a runnable block failed\n{script}\n--- stdout\n"
                               f"{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-3000:]}")
  for name, workdir in main_workdirs(cmds, root).items():
    if name in (outputs or {}):
      outputs[name](workdir)
