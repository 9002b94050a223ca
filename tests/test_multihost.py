"""Two local processes acting as two hosts (launch/local_multiprocess.sh): per-host data
shards become one global batch, checkpoints and evaluations work across processes."""

import os
import subprocess

import pytest

from bigvl.metrics import read_jsonl
from tests.helpers import REPO, tiny_flags


@pytest.mark.slow
def test_two_process_run_and_resume(shapes_data_dir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workdir = str(tmp_path / "w")
  cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2",
         "configs/siglip_shapes.py:tiny", workdir,
         *tiny_flags(shapes_data_dir, total_steps=6, ckpt_every=3)]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(open(f"{workdir}.host{i}.log").read() for i in range(2))
  assert out.returncode == 0, logs[-3000:]
  assert "devices=2" in logs  # one CPU device per process, two processes
  steps = [r["step"] for r in read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r]
  assert steps == [2, 4, 6]
  assert os.path.exists(f"{workdir}/results.json")
  # Re-running resumes from the last checkpoint (nothing left to do) on both hosts.
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(open(f"{workdir}.host{i}.log").read() for i in range(2))
  assert out.returncode == 0, logs[-3000:]
  assert logs.count("resumed from step 6") == 1  # printed by process 0 only
