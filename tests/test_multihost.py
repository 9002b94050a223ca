"""Local processes acting as hosts (launch/local_multiprocess.sh: one CPU device each, gloo
collectives, ``BIGVL_MULTIHOST=1``) against one process simulating the same hosts.

* 4 processes on a ``data=2, fsdp=2`` mesh (parameters sharded across processes) log the
  losses and evaluations of one process training on the same 4-device mesh on the same
  global batches (each simulated host's iterator, concatenated as
  ``make_array_from_process_local_data`` lays them out).
* Checkpoints move between process counts: a 2-process run resumes from a 1-process run's
  checkpoint, and a 1-process run resumes from that 2-process run's checkpoint; both continue
  with the losses of the uninterrupted 1-process run. (The data iterator state is one per-host
  index, the same on every host; a run on a different number of hosts reads its own shards
  from that index, so the resumed runs here are fed the 2-host batches to compare exactly.)
* Each host's iterator reads a disjoint shard (``[p::P]`` of the source) and together they
  cover every example once per epoch.

Everything here compiles with ``jax_disable_most_optimizations`` (XLA's backend at -O0: half
the wall time of these tiny programs on CPU), the processes and the references alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from bigvl import train
from bigvl.data import image_text, sources
from bigvl.metrics import read_jsonl
from tests.helpers import REPO, tiny_config, tiny_flags

#: Six steps (warm-up then cosine decay: the losses move), checkpoints every 2 kept, and the
#: fsdp axis across processes so that every process holds and writes its own shards.
STEPS = {"total_steps": 6, "log_every": 1, "ckpt_every": 2, "keep_ckpts": 3, "mesh.fsdp": 2}
#: The 4-process comparison needs no intermediate checkpoints.
FOUR = {**STEPS, "ckpt_every": 6}
#: Multi-process vs one process: gloo's vs in-process reductions (measured: at most ~1e-7
#: relative on these losses).
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """-O0 for this module's compilations; afterwards the cached executables are dropped so
  that later tests compile theirs with the session's settings."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)
  jax.clear_caches()


@contextlib.contextmanager
def _as_host(index, count):
  """Makes this process look like host ``index`` of ``count`` to code that asks jax."""
  saved = jax.process_index, jax.process_count
  jax.process_index, jax.process_count = (lambda *a: index), (lambda *a: count)
  try:
    yield
  finally:
    jax.process_index, jax.process_count = saved


def _host_iterators(config, num_hosts):
  """Each simulated host's own train iterator (its shard, its per-host batch) of ``config``
  on a ``num_hosts``-device mesh."""
  out = []
  for i in range(num_hosts):
    with _as_host(i, num_hosts):
      run = train.build(config, jax.devices()[:num_hosts])
      assert run.task.host_batch == run.task.batch_size // num_hosts
      out.append(run.task.train_data(run.seed))
  return out


class _GlobalBatches:
  """The global batch the hosts form (host 0's rows, then host 1's, ...) from each host's own
  iterator. Its state is the hosts' common one (a per-host index, as a real run saves it)."""

  def __init__(self, hosts):
    self.hosts = hosts

  def __iter__(self):
    return self

  def __next__(self):
    parts = [next(h) for h in self.hosts]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)

  def get_state(self):
    states = [h.get_state() for h in self.hosts]
    assert all(s == states[0] for s in states), states
    return states[0]

  def set_state(self, state):
    for h in self.hosts:
      h.set_state(state)

  @property
  def num_skipped(self):
    return 0


def _config(data_dir, evals=True, steps=STEPS, **overrides):
  config = tiny_config(data_dir, **{**steps, **overrides})
  if not evals:
    for name in list(config.evals):
      del config.evals[name]
  return config


def _one_process_run(data_dir, workdir, num_hosts, evals=True, steps=STEPS):
  """One process training on ``num_hosts`` of its devices, fed the global batches of
  ``num_hosts`` simulated hosts; resumes from ``workdir``'s checkpoint if it has one."""
  hosts = _host_iterators(_config(data_dir, evals=False, steps=steps), num_hosts)
  config = _config(data_dir, evals=evals, steps=steps)
  run = train.build(config, jax.devices()[:num_hosts])
  run.task.train_data = lambda seed: _GlobalBatches(hosts)
  train.train(config, workdir, run=run)


def _processes_run(num_processes, workdir, data_dir, steps=STEPS):
  """``launch/local_multiprocess.sh`` with the test config; returns the hosts' logs."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  cmd = ["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), str(num_processes),
         "configs/siglip_shapes.py:tiny", workdir, *tiny_flags(data_dir, **steps)]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  logs = [open(f"{workdir}.host{i}.log").read() for i in range(num_processes)]
  assert out.returncode == 0, "\n".join(log[-2000:] for log in logs)
  return logs


def _losses(workdir):
  return {r["step"]: r["loss"] for r in read_jsonl(f"{workdir}/metrics.jsonl") if "loss" in r}


def _assert_losses(got, want, steps):
  assert sorted(got) == sorted(want) == list(steps)
  np.testing.assert_allclose([got[s] for s in steps], [want[s] for s in steps], rtol=RTOL)


def _resume_dir(src, step, dst):
  """A workdir holding only ``src``'s checkpoint at ``step`` and its metrics (a run that
  stopped there)."""
  os.makedirs(f"{dst}/checkpoints")
  shutil.copytree(f"{src}/checkpoints/{step}", f"{dst}/checkpoints/{step}")
  shutil.copy(f"{src}/metrics.jsonl", dst)
  return dst


@pytest.fixture(scope="module")
def four_processes(shapes_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mp") / "four")
  return workdir, _processes_run(4, workdir, shapes_data_dir, FOUR)


@pytest.fixture(scope="module")
def four_hosts_reference(shapes_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("mp") / "four_ref")
  _one_process_run(shapes_data_dir, workdir, 4, steps=FOUR)
  return workdir


@pytest.fixture(scope="module")
def two_hosts_reference(shapes_data_dir, tmp_path_factory):
  """The uninterrupted run: one process, two simulated hosts, checkpoints at 2, 4, 6."""
  workdir = str(tmp_path_factory.mktemp("mp") / "two_ref")
  _one_process_run(shapes_data_dir, workdir, 2, evals=False)
  return workdir


@pytest.fixture(scope="module")
def two_processes_resumed(shapes_data_dir, two_hosts_reference, tmp_path_factory):
  """Two processes resuming from the one-process run's step-2 checkpoint."""
  workdir = _resume_dir(two_hosts_reference, 2, str(tmp_path_factory.mktemp("mp") / "two"))
  return workdir, _processes_run(2, workdir, shapes_data_dir)


@pytest.mark.slow
def test_four_processes_train_as_one(four_processes, four_hosts_reference):
  workdir, logs = four_processes
  assert "devices=4" in logs[0] and "mesh={'data': 2, 'fsdp': 2, 'tensor': 1}" in logs[0]
  assert all("bigvl: task=" not in log for log in logs[1:])  # process 0 reports, alone
  # The same global batches, the same losses step by step (they move: a wrong batch -- one
  # host's rows twice, another host's shard -- or a wrong reduction shows).
  want = _losses(four_hosts_reference)
  _assert_losses(_losses(workdir), want, range(1, 7))
  assert np.ptp(list(want.values())) > 1e-3
  # Evaluations: every host takes its block of each eval batch; the gathered results agree.
  got_eval = json.load(open(f"{workdir}/results.json"))
  want_eval = json.load(open(f"{four_hosts_reference}/results.json"))
  assert got_eval.keys() == want_eval.keys() and len(want_eval) > 5
  for key, value in want_eval.items():
    assert got_eval[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_one_process_checkpoint_resumes_in_two(two_processes_resumed, two_hosts_reference):
  workdir, logs = two_processes_resumed
  text = "".join(logs)
  assert text.count("resumed from step 2") == 1  # printed by process 0 only
  assert "devices=2" in logs[0]
  want = _losses(two_hosts_reference)
  # steps 1-2 were logged by the one-process run, 3-6 by the two processes
  _assert_losses(_losses(workdir), want, range(1, 7))
  assert sorted(int(d) for d in os.listdir(f"{workdir}/checkpoints")) == [2, 4, 6]


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one(two_processes_resumed, two_hosts_reference,
                                               shapes_data_dir, tmp_path, capsys):
  two_proc_dir, _ = two_processes_resumed
  workdir = _resume_dir(two_proc_dir, 4, str(tmp_path / "one"))  # written by two processes
  _one_process_run(shapes_data_dir, workdir, 2, evals=False)
  assert "resumed from step 4" in capsys.readouterr().out
  _assert_losses(_losses(workdir), _losses(two_hosts_reference), range(1, 7))


def test_hosts_read_disjoint_shards_covering_the_data(shapes_data_dir):
  """Four hosts' train iterators over one epoch (512 examples, 4 per host and step): each
  host's examples are its ``[p::4]`` shard, in a shuffled order, with the contents of those
  records; no example is read by two hosts and every example by one."""
  source, _ = sources.get_source("shapes_captions/small", "train",
                                 sources.data_dir(shapes_data_dir))
  specs = image_text.default_train_specs(max_len=16)[:-1] + [
      "cast('scene_id', 'int32', out='id')", "keep(('image', 'tokens', 'id'))"]
  config = _config(shapes_data_dir, **{"input.transforms": specs})
  hosts = _host_iterators(config, 4)
  n, host_batch = len(source), config.input.batch_size // 4
  epoch = [[next(h) for _ in range(n // 4 // host_batch)] for h in hosts]
  by_id = {int(source[i]["scene_id"]): i for i in range(n)}
  assert len(by_id) == n  # the ids name the records
  seen = []
  for p, batches in enumerate(epoch):
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert sorted(by_id[i] for i in ids) == list(range(p, n, 4))  # the shard, each once
    assert ids != sorted(ids)  # shuffled
    images = np.concatenate([b["image"] for b in batches])
    for i, image in zip(ids[:8], images[:8], strict=False):  # the records' own pixels
      np.testing.assert_allclose(image, source[by_id[i]]["image"] * (2 / 255) - 1, atol=1e-6)
    seen += ids
  assert sorted(seen) == sorted(by_id)  # disjoint, and together every example once
  # The next epoch: a new order of the same shard.
  again = np.concatenate([next(hosts[0])["id"] for _ in range(n // 4 // host_batch)]).tolist()
  assert sorted(again) == sorted(np.concatenate([b["id"] for b in epoch[0]]).tolist())
  assert again != np.concatenate([b["id"] for b in epoch[0]]).tolist()
