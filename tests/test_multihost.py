"""Two local processes acting as two hosts (launch/local_multiprocess.sh): per-host data
shards become one global batch -- the losses are those of one process training on the same
global batches -- and checkpoints and evaluations work across processes."""

import contextlib
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from bigvl import train
from bigvl.metrics import read_jsonl
from tests.helpers import REPO, tiny_config, tiny_flags

STEPS = dict(total_steps=6, log_every=1, ckpt_every=3)


@contextlib.contextmanager
def _as_host(index, count):
  """Makes this process look like host ``index`` of ``count`` to code that asks jax."""
  saved = jax.process_index, jax.process_count
  jax.process_index, jax.process_count = (lambda *a: index), (lambda *a: count)
  try:
    yield
  finally:
    jax.process_index, jax.process_count = saved


class _GlobalBatches:
  """The global batch the two hosts form (host 0's rows, then host 1's, as
  ``make_array_from_process_local_data`` lays them out on a 2-device data axis), from each
  host's own train iterator."""

  def __init__(self, hosts):
    self.hosts = hosts

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(h) for h in self.hosts]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def get_state(self):
    return {f"host{i}": h.get_state() for i, h in enumerate(self.hosts)}

  def set_state(self, state):
    for i, h in enumerate(self.hosts):
      h.set_state(state[f"host{i}"])

  @property
  def num_skipped(self):
    return 0


def _one_process_run(data_dir, workdir):
  """The same config trained by this process on 2 of its devices, fed the two hosts' global
  batches."""
  config = tiny_config(data_dir, **STEPS)
  devices = jax.devices()[:2]
  hosts = []
  for i in range(2):
    with _as_host(i, 2):  # the task's per-host batch and shard of the data as host i's
      host_run = train.build(tiny_config(data_dir, **STEPS), devices)
      assert host_run.task.batch_size == 16
      hosts.append(host_run.task.train_data(host_run.seed))
  run = train.build(config, devices)
  run.task.train_data = lambda seed: _GlobalBatches(hosts)
  train.train(config, workdir, run=run)


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_two_process_run_and_resume(shapes_data_dir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  workdir = str(tmp_path / "w")
  cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "2",
         "configs/siglip_shapes.py:tiny", workdir, *tiny_flags(shapes_data_dir, **STEPS)]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(open(f"{workdir}.host{i}.log").read() for i in range(2))
  assert out.returncode == 0, logs[-3000:]
  assert "devices=2" in logs  # one CPU device per process, two processes
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert os.path.exists(f"{workdir}/results.json")

  # The same global batches in one process: the same losses, step by step (they change from
  # step to step, so a wrong batch -- one host's rows twice, another shard -- shows).
  single = str(tmp_path / "single")
  _one_process_run(shapes_data_dir, single)
  want = _losses(single)
  assert sorted(want) == sorted(losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [want[s] for s in sorted(want)], rtol=1e-5)
  assert np.ptp(list(want.values())) > 1e-3
  got_eval = json.load(open(f"{workdir}/results.json"))
  want_eval = json.load(open(f"{single}/results.json"))
  assert got_eval.keys() == want_eval.keys()
  for key, value in want_eval.items():
    assert got_eval[key] == pytest.approx(value, abs=1e-6), key

  # Re-running resumes from the last checkpoint (nothing left to do) on both hosts.
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = "".join(open(f"{workdir}.host{i}.log").read() for i in range(2))
  assert out.returncode == 0, logs[-3000:]
  assert logs.count("resumed from step 6") == 1  # printed by process 0 only
