"""Every command the docs mark runnable runs, so the docs cannot rot.

A fenced block opened with ```` ```console runnable ```` in README.md or docs/*.md holds shell
commands (``#`` comments, ``\\`` continuations); this file runs each block as one bash script
(``set -euo pipefail``) from the repository root, with

* ``/tmp/bigvl`` replaced by a fresh directory per block (commands of a block share it: a
  block may train a model and then evaluate it),
* ``BIGVL_DATA`` pointing at one data directory for the whole file (datasets are prepared
  once, by the first command that needs them),
* ``:tiny`` settings made shorter still: every ``python -m bigvl.main`` command not setting
  its length gets ``--config.total_steps=2`` (the whole flow runs -- data, compile, steps,
  checkpoint, evaluators, plots -- not the minutes of training).

Blocks opened with ```` ```console ```` are shown, not run: full-size runs, real datasets,
accelerators, benchmarks and experiment sweeps (each of those names the script or test that
does run it). The README's demo and the evaluation of its workdir are run in full by
tests/test_demo.py, which checks the README's command is the one it runs.
"""

from __future__ import annotations

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


def test_parser_reads_continuations_and_comments():
  block = "# train\npython -m bigvl.main --config c.py:tiny \\\n  --workdir /tmp/bigvl/x\n\nls\n"
  assert commands(block) == ["python -m bigvl.main --config c.py:tiny --workdir /tmp/bigvl/x",
                             "ls"]
  assert shortened(commands(block)[0], "/r") == (
      "python -m bigvl.main --config c.py:tiny --workdir /r/x --config.total_steps=2")


def test_every_page_with_a_tiny_command_marks_one_runnable():
  """A page that shows a ``:tiny`` training command (a line of its own, not a launcher's
  printed output) has at least one runnable block."""
  with_blocks = {p.values[0] for p in BLOCKS}
  for rel in DOCS:
    text = open(os.path.join(REPO, rel)).read()
    if re.search(r"^python -m bigvl\.main --config configs/\S+:\S*tiny", text, re.M):
      assert rel in with_blocks or rel == "README.md", f"{rel}: no ```console runnable block"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("docs_data"))


@pytest.mark.slow
@pytest.mark.parametrize("page,cmds", BLOCKS)
def test_runnable_block(page, cmds, data_dir, tmp_path):
  script = "set -euo pipefail\n" + "\n".join(shortened(c, str(tmp_path)) for c in cmds)
  res = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                       env=subprocess_env({"BIGVL_DATA": data_dir}), timeout=900)
  assert res.returncode == 0, (f"{page}: a runnable block failed\n{script}\n--- stdout\n"
                               f"{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-3000:]}")
