"""Kill-and-resume: a run killed at any moment and started again with the same command logs
the same losses as an uninterrupted run (params, optimizer state, step, rng and the data
iterator all restored); the loop's runtime knobs (``config.runtime``: buffer donation, async
checkpointing, profiler traces) change nothing it computes. The test kills ``python -m
bigvl.main`` itself: SIGKILL between checkpoints and while an async checkpoint save is in
flight, and SIGTERM (preemption), which the run answers by checkpointing the current step and
exiting 0."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable

import pytest

from tests.helpers import run_main, start_main, tiny_flags

TINY = "configs/siglip_shapes.py:tiny"
TOTAL = 24
_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _flags(data_dir: str) -> list[str]:
  return tiny_flags(data_dir, total_steps=TOTAL, log_every=1, ckpt_every=4)


def _losses(workdir) -> dict[int, float]:
  """Logged train losses by step (a line cut short by a kill is not one)."""
  out = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for ln in f:
        try:
          row = json.loads(ln)
        except json.JSONDecodeError:
          continue
        if "loss" in row:
          out[row["step"]] = row["loss"]
  return out


def _checkpoints(workdir) -> tuple[set[int], set[int]]:
  """(finalised steps, steps whose save is in flight) under ``workdir/checkpoints``."""
  d = os.path.join(workdir, "checkpoints")
  names = os.listdir(d) if os.path.isdir(d) else []
  done = {int(n) for n in names if n.isdigit()}
  return done, {int(m.group(1)) for n in names if (m := _TMP.match(n))}


def _start(cmd: list[str], workdir):
  """Starts ``python -m bigvl.main CMD``; stdout/stderr go to ``<workdir>.out`` / ``.err``."""
  with open(f"{workdir}.out", "w") as out, open(f"{workdir}.err", "w") as err:
    return start_main(cmd, out, err)


def _freeze_when(proc, workdir, moment: Callable[[], bool]) -> tuple[set[int], set[int]]:
  """Once ``moment()`` holds, freezes ``proc`` (SIGSTOP) and returns the checkpoints on disk
  at that instant (:func:`_checkpoints`)."""
  deadline = time.monotonic() + 600
  while not moment():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail(f"the run ended (rc {proc.returncode}) before the moment to stop it:\n"
                  + open(f"{workdir}.err").read()[-3000:])
    time.sleep(0.002)
  proc.send_signal(signal.SIGSTOP)
  return _checkpoints(workdir)


def _assert_resumes_exactly(cmd, workdir, expected_from: int | None, full: dict[int, float]):
  resumed = run_main(cmd)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  if expected_from is None:
    assert "resumed from" not in resumed.stdout
  else:
    assert f"bigvl: resumed from step {expected_from} " in resumed.stdout, resumed.stdout
  got = _losses(workdir)
  assert sorted(got) == list(range(1, TOTAL + 1))
  assert got == full  # exactly: bitwise the same run


@pytest.fixture(scope="module")
def full_losses(shapes_data_dir, tmp_path_factory) -> dict[int, float]:
  """The uninterrupted run's losses."""
  workdir = tmp_path_factory.mktemp("full")
  out = run_main(["--config", TINY, "--workdir", str(workdir), *_flags(shapes_data_dir)])
  assert out.returncode == 0, out.stderr[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, TOTAL + 1))
  assert len(set(losses.values())) > TOTAL // 2  # they move: equality is not between constants
  return losses


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["between_checkpoints", "save_in_flight"])
def test_sigkill_then_rerun_continues_exactly(shapes_data_dir, tmp_path, full_losses, moment):
  workdir = tmp_path / moment
  cmd = ["--config", TINY, "--workdir", str(workdir), *_flags(shapes_data_dir)]

  def between():  # two steps past a finished checkpoint
    done, _ = _checkpoints(workdir)
    return bool(done) and max(_losses(workdir), default=0) >= max(done) + 2

  def in_flight():  # a save that started after step 8 was logged has not finished
    return any(s >= 8 for s in _checkpoints(workdir)[1])

  proc = _start(cmd, workdir)
  while True:  # in flight: if the save finished before SIGSTOP landed, wait for the next one
    done, saving = _freeze_when(proc, workdir,
                                between if moment == "between_checkpoints" else in_flight)
    if moment == "between_checkpoints" or saving:
      break
    proc.send_signal(signal.SIGCONT)
  proc.kill()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  logged = max(_losses(workdir))
  assert logged < TOTAL
  if moment == "save_in_flight":
    assert saving and max(saving) > max(done, default=0)
  else:
    assert logged > max(done)  # it logged steps its checkpoints do not have
  _assert_resumes_exactly(cmd, workdir, max(done, default=None), full_losses)


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_exits_0_and_resumes_exactly(
    shapes_data_dir, tmp_path, full_losses):
  workdir = tmp_path / "preempted"
  cmd = ["--config", TINY, "--workdir", str(workdir), *_flags(shapes_data_dir)]
  proc = _start(cmd, workdir)
  _freeze_when(proc, workdir, lambda: max(_losses(workdir), default=0) >= 6)
  proc.send_signal(signal.SIGTERM)
  proc.send_signal(signal.SIGCONT)
  assert proc.wait(timeout=300) == 0
  out = open(f"{workdir}.out").read()
  m = re.search(r"^bigvl: SIGTERM: checkpointed step (\d+), exiting$", out, re.M)
  assert m, out
  step = int(m.group(1))
  assert 6 <= step < TOTAL
  assert max(_checkpoints(workdir)[0]) == step and not _checkpoints(workdir)[1]
  assert max(_losses(workdir)) == step  # it stopped right there
  _assert_resumes_exactly(cmd, workdir, step, full_losses)


@pytest.mark.slow
def test_runtime_knobs_leave_the_run_bitwise_unchanged(shapes_data_dir, tmp_path, full_losses):
  """No donation, synchronous checkpoints and a profiler trace of steps 3-4: the same losses,
  and the trace is on disk where the run said."""
  workdir = tmp_path / "knobs"
  out = run_main(["--config", TINY, "--workdir", str(workdir), *_flags(shapes_data_dir),
                  "--config.runtime.donate=False", "--config.runtime.async_checkpoint=False",
                  "--config.runtime.profile_start=2", "--config.runtime.profile_steps=2"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"bigvl: profiled steps 3-4 into {workdir}/profile " in out.stdout, out.stdout
  traces = [f for _, _, fs in os.walk(workdir / "profile") for f in fs if f.endswith(".xplane.pb")]
  assert len(traces) == 1
  assert _losses(workdir) == full_losses
