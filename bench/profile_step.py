"""Where a train step's time goes: a ``jax.profiler`` trace of the compiled step, each XLA
thunk's time attributed to its HLO instruction and summed by kind.

  python -m bench.profile_step --config configs/siglip_shapes.py:size=s16 \\
      --config.input.batch_size=32 [--config.key=value ...] [--steps 2] [--top 25] \\
      [--top_ops 25] [--trace_dir D]

Runs with ``--xla_cpu_enable_xprof_traceme`` (set here before jax loads) so that XLA:CPU
records one trace event per thunk (a dot, a fusion, a copy ...). Printed: ms per step by
kind -- ``dot`` / ``conv`` (matmuls, in whatever fusion holds them), ``fusion:<root op>``
(elementwise / reduction loop fusions, by the op that ends them), ``copy`` / ``transpose``
(layout changes), ``scatter`` / ``gather``, ``all-*`` collectives, ``other`` -- and the
``--top`` single instructions with their shapes, so each millisecond has a name, and the
non-matmul time grouped by the jax op it came from with layer numbers folded (``--top_ops``
rows: e.g. the attention's head transposes of all 12 blocks as one row). The sum is
compared with the step's wall time (the rest is thread-pool idle time and dispatch).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? (\S+?)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_LAYER = re.compile(r"(block|layers_?)\d+")


def hlo_index(text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> ``(kind, shape)`` for every instruction of an HLO module's text;
  a fusion's kind names the matmul or convolution inside it (``dot`` / ``conv``), else
  ``fusion:<root opcode>``."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  cur = None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m and "=" not in line.split("{")[0]:
      cur = comps.setdefault(m.group(1), [])
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      calls = _CALLS.search(line)
      cur.append((m.group(1), m.group(2), m.group(3), calls.group(1) if calls else ""))

  def kind_of(opcode: str, calls: str, depth: int = 0) -> str:
    if opcode == "fusion" and calls in comps and depth < 4:
      ops = [op for _, _, op, _ in comps[calls]]
      if "dot" in ops:
        return "dot"
      if "convolution" in ops:
        return "conv"
      for _, _, op, c in comps[calls]:  # nested fusions
        if op == "fusion":
          k = kind_of(op, c, depth + 1)
          if k in ("dot", "conv"):
            return k
      return f"fusion:{ops[-1] if ops else '?'}"
    return {"dot": "dot", "convolution": "conv"}.get(opcode, opcode)

  out = {}
  for instrs in comps.values():
    for name, shape, opcode, calls in instrs:
      out[name] = (kind_of(opcode, calls), shape)
  return out


def op_names(text: str) -> dict[str, str]:
  """Instruction name -> the jax op it came from (its ``op_name`` metadata, without the
  ``jit(...)/`` prefix), layer numbers folded (``block7`` -> ``blockN``) so that the same op of
  every layer is one group; instructions without metadata are absent."""
  out = {}
  for line in text.splitlines():
    m, op = _INSTR.match(line), _OP_NAME.search(line)
    if m and op:
      out[m.group(1)] = _LAYER.sub(r"\1N", op.group(1).split("/", 1)[-1])
  return out


def by_op(by_instr: collections.Counter, index: dict[str, tuple[str, str]],
          ops: dict[str, str]) -> collections.Counter:
  """ms per step of the non-matmul thunks grouped by ``(kind, shape, op)``: where the time
  outside the dots goes, one row per op of a layer (summed over layers)."""
  out: collections.Counter = collections.Counter()
  for name, ms in by_instr.items():
    kind, shape = index[name]
    if kind not in ("dot", "conv"):
      out[(kind, shape, ops.get(name, "?"))] += ms
  return out


def read_trace(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))
  if not paths:
    raise FileNotFoundError(f"no perfetto trace under {trace_dir}")
  with gzip.open(paths[-1]) as f:
    d = json.load(f)
  return d["traceEvents"] if isinstance(d, dict) else d


def attribute(events: list[dict], index: dict[str, tuple[str, str]],
              steps: int) -> tuple[collections.Counter, collections.Counter, float]:
  """``(ms per step by kind, ms per step by instruction, ms per step of all thunks)`` from
  complete ('X') trace events whose name is an HLO instruction."""
  by_kind: collections.Counter = collections.Counter()
  by_instr: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") != "X":
      continue
    name = e.get("name", "")
    if name not in index:
      continue
    ms = e.get("dur", 0) / 1e3 / steps
    by_kind[index[name][0]] += ms
    by_instr[name] += ms
  return by_kind, by_instr, sum(by_kind.values())


def main(argv: list[str] | None = None) -> None:
  argv_given, argv = argv, list(sys.argv[1:] if argv is None else argv)
  if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--top_ops", type=int, default=25,
                 help="rows of the non-matmul time grouped by op (layers folded)")
  p.add_argument("--trace_dir", default="/tmp/bigvl_profile")
  args, rest = p.parse_known_args(argv)
  import time

  import jax

  from bench import throughput
  from bigvl.main import _parse, ensure_host_heap

  config = _parse(["bench.profile_step", *rest], need_workdir=False).config
  ensure_host_heap(config, argv_given)
  _, compiled, state, batch, _ = throughput.compile_step(config)
  state, _, _ = throughput.time_steps(compiled, state, batch, steps=1, warmup=1)
  t0 = time.perf_counter()
  with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
    state, _, times = throughput.time_steps(compiled, state, batch, steps=args.steps,
                                            warmup=0)
  wall_ms = 1e3 * (time.perf_counter() - t0) / args.steps
  text = compiled.as_text()
  index = hlo_index(text)
  by_kind, by_instr, total = attribute(read_trace(args.trace_dir), index, args.steps)
  step_ms = 1e3 * sum(times) / len(times)
  print(f"step {step_ms:.0f} ms (traced; {wall_ms:.0f} ms with the profiler's overhead); "
        f"thunks {total:.0f} ms")
  print("| kind | ms / step | % of thunks |\n|---|---:|---:|")
  for k, ms in by_kind.most_common():
    print(f"| {k} | {ms:.1f} | {100 * ms / total:.1f} |")
  print("\n| top instruction | kind | shape | ms / step |\n|---|---|---|---:|")
  for name, ms in by_instr.most_common(args.top):
    kind, shape = index[name]
    print(f"| {name} | {kind} | {shape} | {ms:.1f} |")
  print("\n| outside the dots: op (layers folded) | kind | shape | ms / step |\n|---|---|---|---:|")
  for (kind, shape, op), ms in by_op(by_instr, index, op_names(text)).most_common(args.top_ops):
    print(f"| {op[-100:]} | {kind} | {shape} | {ms:.1f} |")


if __name__ == "__main__":
  main()
