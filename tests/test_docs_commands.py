"""The docs' runnable blocks (tests/docs_blocks.py) of README.md, docs/index.md,
docs/datasets.md and the vision-language pages; the label-efficient pages' blocks run in
tests/test_docs_commands_label_efficient.py, on the other pytest-xdist worker."""

from __future__ import annotations

import os
import re

import pytest

from tests.docs_blocks import (
  BLOCKS,
  DOCS,
  LABEL_EFFICIENT,
  REPO,
  commands,
  results,
  run_block,
  shortened,
  unused_checks,
)


def test_parser_reads_continuations_and_comments():
  block = "# train\npython -m bigvl.main --config c.py:tiny \\\n  --workdir /tmp/bigvl/x\n\nls\n"
  assert commands(block) == ["python -m bigvl.main --config c.py:tiny --workdir /tmp/bigvl/x",
                             "ls"]
  assert shortened(commands(block)[0], "/r") == (
      "python -m bigvl.main --config c.py:tiny --workdir /r/x --config.total_steps=2")


def test_every_page_with_a_tiny_command_marks_one_runnable():
  """A page that shows a ``:tiny`` training command (a line of its own, not a launcher's
  printed output) has at least one runnable block, or shows only the README's demo (which
  tests/test_demo.py runs in full)."""
  with_blocks = {p.values[0] for p in BLOCKS}
  demo = re.search(r"```console\n(.*?)\n", open(os.path.join(REPO, "README.md")).read())
  demo_cmds = set(demo.group(1).split(" && "))
  for rel in DOCS:
    text = open(os.path.join(REPO, rel)).read()
    tiny = set(re.findall(r"^python -m bigvl\.\w+ --config configs/\S+:\S*tiny.*$", text, re.M))
    if tiny and not tiny <= demo_cmds:
      assert rel in with_blocks, f"{rel}: no ```console runnable block"
  assert set(LABEL_EFFICIENT) <= with_blocks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("docs_data"))


def _vladva(workdir: str) -> None:
  """VladVA's run evaluates retrieval, zero-shot and compositionality (from docs/vladva.md's
  captioner: the tiny config's end-to-end run)."""
  r = results(workdir)
  for key in ("retrieval/i2t_R@1", "zeroshot/accuracy", "compositionality/accuracy_swap_object"):
    assert 0 <= r[key] <= 1, key


#: workdir name in a block (``/tmp/bigvl/<name>``) -> the check of what its run leaves
OUTPUTS = {"vladva": _vladva}


@pytest.mark.slow
@pytest.mark.parametrize("page,cmds", [p for p in BLOCKS if p.values[0] not in LABEL_EFFICIENT])
def test_runnable_block(page, cmds, data_dir, tmp_path):
  run_block(cmds, data_dir, str(tmp_path), OUTPUTS)


def test_every_checked_workdir_is_in_a_block():
  assert not unused_checks(OUTPUTS, lambda page: page not in LABEL_EFFICIENT)
