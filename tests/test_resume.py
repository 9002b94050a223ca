"""Kill-and-resume: a run killed at step k and restarted logs the same losses as an
uninterrupted run (params, optimizer state, step, rng and the data iterator all restored)."""

import pytest

from bigvl.metrics import read_jsonl
from tests.helpers import run_main, tiny_flags

TINY = "configs/siglip_shapes.py:tiny"


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_killed_run_resumes_exactly(shapes_data_dir, tmp_path):
  flags = tiny_flags(shapes_data_dir, total_steps=12, log_every=1, ckpt_every=4)
  full = run_main(["--config", TINY, "--workdir", str(tmp_path / "full"), *flags])
  assert full.returncode == 0, full.stderr[-3000:]

  killed = run_main(["--config", TINY, "--workdir", str(tmp_path / "killed"), *flags],
                    env_extra={"BIGVL_TEST_KILL_AT_STEP": "7"})
  assert killed.returncode == 17, killed.stderr[-3000:]
  assert max(_losses(tmp_path / "killed")) == 7  # it logged past its last checkpoint (4)

  resumed = run_main(["--config", TINY, "--workdir", str(tmp_path / "killed"), *flags])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 4" in resumed.stdout

  a, b = _losses(tmp_path / "full"), _losses(tmp_path / "killed")
  assert sorted(a) == sorted(b) == list(range(1, 13))
  for step in a:
    assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
  assert len(set(a.values())) > 6  # the losses move: equality is not between constants
