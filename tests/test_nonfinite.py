"""A whole logging interval of non-finite steps stops the run with FloatingPointError, and the
last good checkpoint is what is left: resuming from it continues as if nothing happened."""

import os

import ml_collections
import pytest

from bigvl import checkpoint, train
from bigvl.config import load_sibling
from bigvl.metrics import read_jsonl
from tests.helpers import REPO


def _config(**overrides):
  """semisup_mnist.py:supervised,tiny (SmallCNN, batch 16), no evaluation, a checkpoint
  every 2 steps, a constant learning rate (so that runs of different lengths share it)."""
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist").get_config(
      "supervised,tiny")
  del c.evals["test"]
  c.schedule = ml_collections.ConfigDict({"warmup_steps": 0, "decay": "constant"})
  c.update_from_flattened_dict({"total_steps": 2, "log_every": 2, "ckpt_every": 2,
                                "keep_ckpts": 5, **overrides})
  return c


def _losses(workdir):
  return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "loss" in r}


@pytest.mark.slow
def test_non_finite_interval_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  workdir = str(tmp_path / "w")
  train.train(_config(), workdir)  # steps 1-2, checkpoint 2
  # The same run continued with inputs that overflow to inf (x / 255 - mean) / 1e-45: every
  # loss is NaN from step 3 on, steps 3 and 4 are refused, and at the step-4 log the whole
  # interval of 2 was refused: stop, before step 4 is checkpointed.
  capsys.readouterr()
  with pytest.raises(FloatingPointError, match="every step of the last 2") as err:
    train.train(_config(total_steps=8, **{"input.std": (1e-45,)}), workdir)
  out = capsys.readouterr().out
  assert "resumed from step 2" in out
  assert "refused 2 update(s)" in out
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.all_steps() == [2]
  assert ckpt.directory in str(err.value)
  ckpt.close()
  assert max(_losses(workdir)) == 2  # nothing logged for the refused steps

  # Resuming with good inputs continues from the good state of step 2 exactly as a run that
  # never saw the bad inputs.
  train.train(_config(total_steps=4, log_every=1), workdir)
  assert "resumed from step 2" in capsys.readouterr().out
  reference = str(tmp_path / "ref")
  train.train(_config(total_steps=4, log_every=1), reference)
  got, want = _losses(workdir), _losses(reference)
  for step in (3, 4):
    assert got[step]["skipped_steps"] == 0
    assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5)
