"""``bigvl.metrics``: throughput arithmetic (examples/s counts what a step processes, ETA,
TFLOP/s, MFU), the progress line, and the jsonl cut-back on resume."""

import io

import pytest

from bigvl import metrics


class _Clock:
  def __init__(self, t: float):
    self.t = t

  def __call__(self) -> float:
    return self.t


@pytest.fixture
def clock(monkeypatch):
  c = _Clock(100.0)
  monkeypatch.setattr(metrics.time, "perf_counter", c)
  return c


def _writer(tmp_path, examples_per_step=48, total_steps=1000, step_flops=None):
  return metrics.MetricWriter(str(tmp_path), total_steps, examples_per_step, tensorboard=False,
                              stream=io.StringIO(), step_flops=step_flops)


def test_throughput_counts_examples_per_step_from_the_start_step(tmp_path, clock):
  w = _writer(tmp_path, examples_per_step=48)  # e.g. semi-supervised: 16 labeled + 32 unlabeled
  assert not w.started
  assert w.compute_metrics(5) == {}
  w.start(10)  # after the first (compiling) step
  assert w.started
  clock.t = 104.0
  ex_s, eta = w.throughput(30)  # 20 steps in 4 s
  assert ex_s == pytest.approx(5.0 * 48)
  assert eta == pytest.approx((1000 - 30) / 5.0)
  assert w.compute_metrics(30) == {"examples_per_s": pytest.approx(240.0)}
  assert w.compute_metrics(10) == {}  # no step since start: no rate


def test_flops_and_mfu_come_from_steps_per_second(tmp_path, clock):
  w = _writer(tmp_path, examples_per_step=48, step_flops=2e12)
  w.peak = 100e12
  w.start(0)
  clock.t = 110.0
  got = w.compute_metrics(20)  # 2 steps/s
  assert got["examples_per_s"] == pytest.approx(96.0)
  assert got["tflops_per_device"] == pytest.approx(4.0)
  assert got["mfu"] == pytest.approx(0.04)


def test_progress_line_says_what_examples_per_second_counts(tmp_path, clock):
  w = _writer(tmp_path, examples_per_step=48, total_steps=100)
  w.start(0)
  clock.t = 102.0
  w.progress(10, {"loss": 1.23456, "lr": 0.5}, ("loss", "lr"))
  assert w.stream.getvalue() == ("step 10/100 | loss 1.235 | lr 0.5 | 240 ex/s (48 per step) | "
                                 "ETA 0m18s\n")


def test_write_and_truncate_jsonl(tmp_path):
  w = _writer(tmp_path)
  for step in (2, 4, 6):
    w.write(step, {"loss": step / 10})
  with open(w.jsonl_path, "a") as f:
    f.write('{"step": 8, "lo')  # a line cut short by a kill
  metrics.truncate_jsonl(w.jsonl_path, 4)
  assert metrics.read_jsonl(w.jsonl_path) == [{"step": 2, "loss": 0.2}, {"step": 4, "loss": 0.4}]


def test_tensorboard_writer_loads_without_torch_and_writes_scalars(tmp_path):
  """tensorboardX would import PyTorch (2.4 s of every run's start where it is installed);
  the writer comes without it, its events hold the scalars, and torch still imports after."""
  import subprocess
  import sys

  from tests.helpers import REPO, subprocess_env

  code = (
      "import sys\n"
      "from bigvl import metrics\n"
      "w = metrics.MetricWriter(sys.argv[1], total_steps=2, examples_per_step=4)\n"
      "w.write(1, {'loss': 0.5})\n"
      "w.close()\n"
      "print('torch' in sys.modules)\n"
      "import importlib.util\n"
      "print(importlib.util.find_spec('torch') is None or __import__('torch') is not None)\n")
  out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["False", "True"]
  import glob
  import struct

  from tensorboardX.proto import event_pb2

  scalars = []
  for path in glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")):
    data = open(path, "rb").read()
    while data:  # TFRecord: uint64 length, uint32 crc, payload, uint32 crc
      (n,) = struct.unpack("<Q", data[:8])
      event = event_pb2.Event.FromString(data[12:12 + n])
      scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
      data = data[12 + n + 4:]
  assert scalars == [(1, "loss", 0.5)]
