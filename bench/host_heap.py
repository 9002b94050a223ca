"""What ``runtime.host_heap`` buys a CPU run (bigvl/heap.py): per step of a config's compiled
train step, the wall time, the minor page faults and the system CPU time, with glibc's
default heap (``system``) and with the retained one (``retain``), each in a fresh process.

  python -m bench.host_heap --config configs/siglip_shapes.py:size=s16 \\
      --config.input.batch_size=32 [--steps 4] [--modes system,retain]

A fault is the kernel mapping (and zeroing) one 4 KiB page the process touches for the first
time; with ``system`` XLA:CPU's per-step temp buffer is ``munmap``-ed at the end of each step
and faulted in again by the next, with ``retain`` it stays mapped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one(mode: str, steps: int, rest: list[str]) -> None:
  """In the measuring subprocess: compile the step, then time ``steps`` executions after one
  warm-up; prints one JSON line."""
  from bigvl import heap
  from bigvl.main import _parse

  config = _parse(["bench.host_heap", *rest], need_workdir=False).config
  heap.ensure(mode)  # 'system': returns; 'retain': re-executes this command under the tunables
  import jax

  from bench import throughput

  _, compiled, state, batch, _ = throughput.compile_step(config)
  rows = []
  for i in range(steps + 1):
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state, aux = compiled(state, batch)
    jax.block_until_ready((state, aux))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if i:  # the first execution maps its buffers in either mode
      rows.append({"step_s": time.perf_counter() - t0, "minflt": r1.ru_minflt - r0.ru_minflt,
                   "sys_s": r1.ru_stime - r0.ru_stime, "user_s": r1.ru_utime - r0.ru_utime})
  print(json.dumps({"mode": mode, "retained": heap.in_effect(), "steps": rows,
                    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--modes", default="system,retain")
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  a, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
  if a._one:
    _one(a._one, a.steps, rest)
    return []
  out = []
  print("| host heap | step ms (median) | minor faults / step | system CPU s / step | "
        "user CPU s / step | max RSS MB |\n|---|---:|---:|---:|---:|---:|", flush=True)
  for mode in a.modes.split(","):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    res = subprocess.run([sys.executable, "-m", "bench.host_heap", "--_one", mode,
                          "--steps", str(a.steps), *rest], cwd=REPO, env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode:
      raise RuntimeError(f"{mode} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    med = lambda k, r=r: statistics.median(s[k] for s in r["steps"])
    print(f"| {mode} | {1e3 * med('step_s'):.0f} | {med('minflt'):.0f} | {med('sys_s'):.2f} | "
          f"{med('user_s'):.2f} | {r['max_rss_mb']:.0f} |", flush=True)
    out.append(r)
  return out


if __name__ == "__main__":
  main()
