"""The runnable blocks (tests/docs_blocks.py) of the label-efficient pages: semi-supervised,
domain adaptation, segmentation, few-shot. A block's training runs leave what their page says
they do (:data:`OUTPUTS`, by workdir name): the methods' own metrics in ``results.json`` and
the figures; these runs are the tiny configs' end-to-end tests."""

from __future__ import annotations

import os

import pytest

from tests.docs_blocks import BLOCKS, LABEL_EFFICIENT, results, run_block, unused_checks


def _overlays(workdir: str, step: int) -> None:
  """The segmentation evaluator's overlay strips of the last evaluation (6 by default)."""
  pngs = os.listdir(os.path.join(workdir, "segmentation", "test"))
  assert len(pngs) == 6 and all(p.startswith(f"step_{step}_") for p in pngs), pngs


def _cct(workdir: str) -> None:
  r = results(workdir)
  assert 0 <= r["test/miou"] <= 1 and 0 < r["test/pixel_accuracy"] <= 1
  _overlays(workdir, r["step"])


def _arseg(workdir: str) -> None:
  r = results(workdir)
  assert 0 <= r["test/miou"] <= 1 and 1 <= r["test/num_clusters_used"] <= 5
  assert 0 < r["test_ensemble/pixel_accuracy"] <= 1
  _overlays(workdir, r["step"])


def _da(workdir: str) -> None:
  r = results(workdir)  # the target accuracy (the metric) and the source one (a sanity check)
  assert 0 <= r["target/accuracy"] <= 1 and 0 <= r["source/accuracy"] <= 1


#: workdir name in a block (``/tmp/bigvl/<name>``) -> the check of what its run leaves
OUTPUTS = {"cct": _cct, "arseg": _arseg, "da": _da}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("docs_data"))


@pytest.mark.slow
@pytest.mark.parametrize("page,cmds", [p for p in BLOCKS if p.values[0] in LABEL_EFFICIENT])
def test_runnable_block(page, cmds, data_dir, tmp_path):
  run_block(cmds, data_dir, str(tmp_path), OUTPUTS)


def test_every_checked_workdir_is_in_a_block():
  assert not unused_checks(OUTPUTS, lambda page: page in LABEL_EFFICIENT)
