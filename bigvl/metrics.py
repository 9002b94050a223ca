"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard events
and a console progress line (step, loss, examples/s, ETA). Only process 0 writes.

Throughput counts every example a train step processes, ``task.examples_per_step``: the
global batch for a two-tower task, labeled plus unlabeled images for a semi-supervised one.
The progress line says so (``1234 ex/s (48 per step)``); ``examples_per_s`` in the jsonl is
the same number, and ``tflops_per_device`` / ``mfu`` come from steps per second."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops lines logged after ``max_step`` (by a run that died before its next checkpoint)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [ln for ln in f if ln.strip()]
  keep = []
  for ln in lines:
    try:
      if json.loads(ln).get("step", 0) <= max_step:
        keep.append(ln)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
  with open(path + ".tmp", "w") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


# Dense bf16 peak FLOP/s per device, by jax's device_kind (vendor datasheets).
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12, "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
  for name, value in PEAK_FLOPS.items():
    if device_kind.startswith(name):
      return value
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled (SPMD-partitioned: per-device) XLA program."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0))
    return flops if flops > 0 else None
  except Exception:  # noqa: BLE001 -- not every backend reports costs
    return None


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(ln) for ln in f if ln.strip()]


def summary_writer_class() -> type:
  """tensorboardX's ``SummaryWriter``, imported without PyTorch: tensorboardX imports torch
  when it can (only to accept torch tensors), 2.4 s and ~300 MB of a run's start where torch
  is installed. Scalars need none of it; a torch already imported is left as it is."""
  if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
      import tensorboardX  # noqa: F401
    finally:
      del sys.modules["torch"]
  from tensorboardX import SummaryWriter

  return SummaryWriter


class MetricWriter:
  """Writes scalars to jsonl + TensorBoard, prints the progress line."""

  def __init__(self, workdir: str, total_steps: int, examples_per_step: int,
               tensorboard: bool = True, stream: Any = None, step_flops: float | None = None):
    self.active = jax.process_index() == 0
    self.total_steps, self.examples_per_step = total_steps, examples_per_step
    self.stream = stream or sys.stdout
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        self._tb = summary_writer_class()(os.path.join(workdir, "tb"), flush_secs=30)
    self._t0, self._step0 = None, None
    self.step_flops = step_flops  # per device
    self.peak = peak_flops(jax.devices()[0].device_kind)

  def compute_metrics(self, step: int) -> dict[str, float]:
    """examples/s, and per-device TFLOP/s and MFU where the step's FLOPs are known."""
    steps_s = self.steps_per_s(step)
    if not math.isfinite(steps_s):
      return {}
    out = {"examples_per_s": steps_s * self.examples_per_step}
    if self.step_flops:
      achieved = self.step_flops * steps_s
      out["tflops_per_device"] = achieved / 1e12
      if self.peak:
        out["mfu"] = achieved / self.peak
    return out

  def start(self, step: int) -> None:
    """Starts the throughput clock at ``step`` (after the first, compiling, step)."""
    self._t0, self._step0 = time.perf_counter(), step

  @property
  def started(self) -> bool:
    """Whether :meth:`start` was called."""
    return self._t0 is not None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": step, **clean}) + "\n")
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)

  def steps_per_s(self, step: int) -> float:
    """Train steps per second since :meth:`start` (NaN before a step after it)."""
    if self._t0 is None or step <= self._step0:
      return float("nan")
    return (step - self._step0) / (time.perf_counter() - self._t0)

  def throughput(self, step: int) -> tuple[float, float]:
    """(examples/s since start, seconds left)."""
    steps_s = self.steps_per_s(step)
    return steps_s * self.examples_per_step, (self.total_steps - step) / steps_s

  def progress(self, step: int, scalars: dict[str, float], keys: tuple[str, ...]) -> None:
    if not self.active:
      return
    ex_s, eta = self.throughput(step)
    parts = [f"step {step}/{self.total_steps}"]
    for k in keys:
      if k in scalars:
        parts.append(f"{k} {scalars[k]:.4g}")
    parts.append(f"{ex_s:.0f} ex/s" if math.isfinite(ex_s) else "- ex/s")
    parts[-1] += f" ({self.examples_per_step} per step)"
    if "mfu" in scalars:
      parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    parts.append(f"ETA {_fmt_time(eta)}")
    print(" | ".join(parts), file=self.stream, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
