"""``config.runtime`` profiling: a trace of the configured steps, and one of the next steps
after ``kill -USR1`` (bigvl.train._Profiler), each holding whole steps."""

import os
import signal

import jax.numpy as jnp
import ml_collections
import pytest

from bigvl.config import ConfigError, Reader
from bigvl.train import _Profiler, read_runtime


def _traces(d):
  return sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs
                if f.endswith(".xplane.pb"))


def _steps(p, first, last):
  x = jnp.ones(3)
  for step in range(first, last):
    p.before(step)
    x = x * 2
    p.after(step + 1, x)


def test_configured_window_traces_those_steps_only(tmp_path, capsys):
  p = _Profiler(str(tmp_path), start=2, steps=3)
  _steps(p, 0, 8)
  p.close(8)
  assert "bigvl: profiled steps 3-5 into" in capsys.readouterr().out
  assert len(_traces(tmp_path)) == 1


def test_sigusr1_traces_the_next_steps(tmp_path, capsys):
  p = _Profiler(str(tmp_path), start=0, steps=0)
  try:
    _steps(p, 0, 2)
    assert not _traces(tmp_path)  # nothing configured, nothing asked
    os.kill(os.getpid(), signal.SIGUSR1)
    _steps(p, 2, 9)
  finally:
    p.close(9)
  assert "bigvl: profiled steps 3-5 into" in capsys.readouterr().out  # 3 steps by default
  assert len(_traces(tmp_path)) == 1
  assert signal.getsignal(signal.SIGUSR1) is not p._handler  # restored


def test_a_trace_still_open_at_the_end_is_closed(tmp_path, capsys):
  p = _Profiler(str(tmp_path), start=1, steps=10)
  _steps(p, 0, 4)
  p.close(4)
  assert "bigvl: profiled steps 2-4 into" in capsys.readouterr().out
  assert len(_traces(tmp_path)) == 1


def test_runtime_defaults_and_bad_values():
  assert read_runtime(None) == {"async_checkpoint": True, "donate": True, "profile_start": 0,
                                "profile_steps": 0, "host_heap": "auto"}
  with pytest.raises(ConfigError, match="host_heap='maybe': one of auto, retain, system"):
    read_runtime(Reader(ml_collections.ConfigDict(
        {"runtime": {"host_heap": "maybe"}})).get("runtime"))
  bad = ml_collections.ConfigDict({"runtime": {"profile_start": -2}})
  with pytest.raises(ConfigError, match="profile_start must be >= 0"):
    read_runtime(Reader(bad).get("runtime"))
