"""Train-step throughput of any bigvl config: examples/s, step time, FLOPs, MFU, memory.

  python -m bench.throughput --config configs/siglip_shapes.py:size=s16 \\
      --config.input.batch_size=32 [--config.key=value ...] [--steps 5] [--warmup 2] [--json F]

The step is the one ``bigvl.train`` runs (``train.build`` -> ``compile_run``: the task's
model and loss, the optimizer, the sharded, donated ``jax.jit``), fed one real batch of the
config's data over and over (the input pipeline is not what is timed). Printed:

* ``step_s``: the median of ``--steps`` timed steps after ``--warmup`` untimed ones (each
  step waited for with ``block_until_ready``), and examples/s = batch / step_s;
* ``flops``: model FLOPs per step from XLA's cost analysis of the compiled step (forward,
  backward and optimizer, per device; x devices for the whole step);
* achieved FLOP/s = flops / step_s per device, and MFU = achieved / peak, where the peak is
  the datasheet's dense bf16 peak of a known GPU/TPU (``bigvl.metrics.PEAK_FLOPS``) or, on a
  CPU, a measured large matmul (:func:`cpu_peak_flops`) in the step's compute dtype;
* ``compile_s``: lowering + compiling the step; ``xla_temp_mb`` / ``xla_args_mb``: XLA's
  memory analysis of the compiled step (temporaries; arguments = state + batch);
  ``max_rss_mb``: the process's peak resident memory (CPU: includes everything above);
* ``host_heap``: ``retain`` when the process runs with :mod:`bigvl.heap`'s glibc tunables
  (run from the command line, the step is timed as ``bigvl.main`` runs it:
  ``config.runtime.host_heap``), else ``system``.

Data: ``config.input.data_dir`` if set, else ``$BIGVL_DATA``, else ``/tmp/bigvl_bench_data``
(``shapes_captions/small`` is prepared there once when the config names ``shapes_captions``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

BENCH_DATA = "/tmp/bigvl_bench_data"


def cpu_peak_flops(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
  """The CPU's practical peak: FLOP/s of a jitted ``n x n x n`` matmul in ``dtype`` (f32
  accumulation), the median of ``reps`` after one warm-up."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  dt = jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n)), dt)
  b = jnp.asarray(rng.standard_normal((n, n)), dt)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n**3 / statistics.median(times)


def peak_flops(device: Any, dtype: str) -> tuple[float | None, str]:
  """``(peak FLOP/s per device, where it comes from)``."""
  from bigvl import metrics

  if device.platform == "cpu":
    return cpu_peak_flops(dtype), f"measured 2048^3 {dtype} matmul"
  peak = metrics.peak_flops(device.device_kind)
  return peak, (f"datasheet dense bf16 ({device.device_kind})" if peak else "unknown device")


def prepare_data(config: Any) -> None:
  """Points the config at a data dir holding its dataset (``shapes_captions/small`` is
  built there once if the config names a ``shapes_captions`` dataset)."""
  from bigvl.data import sources

  inp = config.input
  if not inp.get("data_dir"):
    with inp.unlocked():
      inp.data_dir = os.environ.get("BIGVL_DATA") or BENCH_DATA
  if str(inp.dataset).startswith("shapes_captions"):
    with inp.unlocked():
      inp.dataset = "shapes_captions/small"
    sources.tfds_builder("shapes_captions/small", inp.data_dir)


def compile_step(config: Any) -> tuple[Any, Any, Any, Any, float]:
  """``(run, compiled step, state, batch, compile seconds)`` of ``config``'s train step, fed
  one real batch of its data."""
  from bigvl import parallel, train

  prepare_data(config)
  run = train.build(config)
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  t0 = time.perf_counter()
  compiled = fns.step.lower(state, batch).compile()
  return run, compiled, state, batch, time.perf_counter() - t0


def time_steps(compiled: Any, state: Any, batch: Any, *, steps: int,
               warmup: int) -> tuple[Any, Any, list[float]]:
  """Runs ``warmup + steps`` steps; ``(state, aux, seconds of each timed step)``."""
  import jax

  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, aux = compiled(state, batch)
    jax.block_until_ready((state, aux))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return state, aux, times


def measure(config: Any, *, steps: int = 5, warmup: int = 2, spec: str = "") -> dict[str, Any]:
  """Builds the run of ``config`` and times its compiled train step (see the module doc)."""
  import jax
  import numpy as np

  from bigvl import heap, metrics

  run, compiled, state, batch, compile_s = compile_step(config)
  state, aux, times = time_steps(compiled, state, batch, steps=steps, warmup=warmup)
  loss = float(np.asarray(aux["loss"]))
  if not np.isfinite(loss):
    raise FloatingPointError(f"the benchmarked step's loss is {loss}")
  step_s = statistics.median(times)
  flops = metrics.compiled_flops(compiled)
  mem = compiled.memory_analysis()
  dtype = str(config.model.get("dtype") or "float32")
  peak, peak_src = peak_flops(jax.devices()[0], dtype)
  achieved = flops / step_s if flops else None
  return {
      "config": spec, "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(), "dtype": dtype, "batch": run.task.batch_size,
      "examples_per_s": run.task.examples_per_step / step_s, "step_s": step_s,
      "step_s_all": times, "flops_per_device": flops,
      "achieved_flops_per_device": achieved, "peak_flops": peak, "peak_source": peak_src,
      "mfu": achieved / peak if achieved and peak else None, "compile_s": compile_s,
      "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20,
      "xla_args_mb": getattr(mem, "argument_size_in_bytes", 0) / 2**20,
      "xla_out_mb": getattr(mem, "output_size_in_bytes", 0) / 2**20,
      "xla_alias_mb": getattr(mem, "alias_size_in_bytes", 0) / 2**20,
      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loss": loss,
      "host_heap": "retain" if heap.in_effect() else "system"}


def format_row(r: dict[str, Any]) -> str:
  g = lambda x, s=1e9: f"{x / s:.1f}" if x else "?"
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "?"
  return (f"{r['config']} {r['dtype']} batch {r['batch']} on {r['devices']}x {r['device']}: "
          f"{r['examples_per_s']:.2f} ex/s, step {1e3 * r['step_s']:.0f} ms (median of "
          f"{len(r['step_s_all'])}), {g(r['flops_per_device'])} GFLOP/step/device, "
          f"{g(r['achieved_flops_per_device'])} GFLOP/s, MFU {mfu} of "
          f"{g(r['peak_flops'])} GFLOP/s ({r['peak_source']}), compile {r['compile_s']:.1f} s, "
          f"XLA temp {r['xla_temp_mb']:.0f} MB + args {r['xla_args_mb']:.0f} MB, "
          f"max RSS {r['max_rss_mb']:.0f} MB, host heap {r.get('host_heap', '?')}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  cli_argv, argv = argv, list(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--json", default=None, help="append the result as one JSON line here")
  args, rest = p.parse_known_args(argv)
  from bigvl.main import _parse, _take_config_flag, ensure_host_heap

  fv = _parse(["bench.throughput", *rest], need_workdir=False)
  ensure_host_heap(fv.config, cli_argv)  # the step as bigvl.main runs it
  spec = " ".join([_take_config_flag(rest)[0] or "", *_take_config_flag(rest)[1]])
  res = measure(fv.config, steps=args.steps, warmup=args.warmup, spec=spec)
  print(format_row(res), flush=True)
  if args.json:
    with open(args.json, "a") as f:
      f.write(json.dumps(res) + "\n")
  return res


if __name__ == "__main__":
  main()
