"""The runnable blocks (tests/docs_blocks.py) of the label-efficient pages: semi-supervised,
domain adaptation, segmentation, few-shot."""

from __future__ import annotations

import pytest

from tests.docs_blocks import BLOCKS, LABEL_EFFICIENT, run_block


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("docs_data"))


@pytest.mark.slow
@pytest.mark.parametrize("page,cmds", [p for p in BLOCKS if p.values[0] in LABEL_EFFICIENT])
def test_runnable_block(page, cmds, data_dir, tmp_path):
  run_block(cmds, data_dir, str(tmp_path))
