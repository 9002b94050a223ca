"""What each speed / memory knob buys on one train step: step time, compile time, memory.

  python -m bench.knobs [--config configs/siglip_shapes.py:size=s16] [--batch 32] \\
      [--knobs f32,bf16,remat_full,remat_dots,scan,scan_remat_full,no_donate] \\
      [--steps 3] [--warmup 1] [--out F.md] [--json F.jsonl]

Each knob is a set of ``--config`` overrides of the same experiment (:data:`KNOBS`; the
towers' ``remat`` / ``scan`` and ``model.dtype`` are config fields of
``configs/siglip_shapes.py``, ``runtime.donate`` is the loop's). Every row is one
``python -m bench.throughput`` run in its own process (its compile time and peak RSS are its
own): step time is the median of ``--steps`` after ``--warmup``; memory is XLA's
``memory_analysis()`` of the compiled step (temp: activations kept for the backward, the
gradients and the optimizer's scratch; args: state + batch; alias: outputs written into
donated inputs) and the process's peak RSS. The rows share the machine, so compare them
within one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _towers(key: str, value: str) -> list[str]:
  return [f"--config.model.{t}.{key}={value}" for t in ("image", "text")]


#: knob name -> (what it is, its overrides)
KNOBS: dict[str, tuple[str, list[str]]] = {
    "f32": ("float32 (reference)", []),
    "bf16": ("bf16 matmuls, f32 params/optimizer", ["--config.model.dtype=bfloat16"]),
    "remat_full": ("remat: full (each block recomputed)", _towers("remat", "full")),
    "remat_dots": ("remat: dots (matmul outputs kept)", _towers("remat", "dots")),
    "remat_dots_no_batch": ("remat: dots_no_batch", _towers("remat", "dots_no_batch")),
    "scan": ("nn.scan over layers", _towers("scan", "True")),
    "scan_remat_full": ("nn.scan + remat full", [*_towers("scan", "True"),
                                                  *_towers("remat", "full")]),
    "no_donate": ("no buffer donation", ["--config.runtime.donate=False"]),
    "system_heap": ("glibc's default heap (no retained scratch)",
                    ["--config.runtime.host_heap=system"]),
}


def run_knob(name: str, config: str, batch: int, steps: int, warmup: int,
             extra: list[str]) -> dict:
  """One ``bench.throughput`` measurement of ``config`` with knob ``name``'s overrides."""
  with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
    out_json = f.name
  cmd = [sys.executable, "-m", "bench.throughput", "--config", config,
         f"--config.input.batch_size={batch}", *KNOBS[name][1], *extra,
         "--steps", str(steps), "--warmup", str(warmup), "--json", out_json]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"knob {name} failed:\n{proc.stderr[-3000:]}")
  with open(out_json) as f:
    r = json.loads(f.read().strip().splitlines()[-1])
  os.unlink(out_json)
  r["knob"] = name
  return r


def table(rows: list[dict]) -> str:
  """Markdown: one row per knob, with its step time relative to the first row."""
  base = rows[0]["step_s"]
  lines = ["| knob | step ms | vs first | examples/s | GFLOP/s | compile s | XLA temp MB | "
           "XLA args MB | alias MB | peak RSS MB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    gfs = r["achieved_flops_per_device"] / 1e9 if r.get("achieved_flops_per_device") else 0
    lines.append(
        f"| {KNOBS[r['knob']][0]} | {1e3 * r['step_s']:.0f} | {r['step_s'] / base:.2f} | "
        f"{r['examples_per_s']:.2f} | {gfs:.0f} | {r['compile_s']:.1f} | "
        f"{r['xla_temp_mb']:.0f} | {r['xla_args_mb']:.0f} | {r.get('xla_alias_mb', 0):.0f} | "
        f"{r['max_rss_mb']:.0f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/siglip_shapes.py:size=s16")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--knobs", default="f32,bf16,remat_full,remat_dots,scan,scan_remat_full,"
                 "no_donate")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--out", default=None, help="write the markdown table (with the command)")
  p.add_argument("--json", default=None, help="append every row here")
  args, extra = p.parse_known_args(argv)
  names = args.knobs.split(",")
  unknown = [n for n in names if n not in KNOBS]
  if unknown:
    p.error(f"unknown knobs {unknown}; choose from {list(KNOBS)}")
  rows = []
  for name in names:
    r = run_knob(name, args.config, args.batch, args.steps, args.warmup, extra)
    rows.append(r)
    print(f"{name}: step {1e3 * r['step_s']:.0f} ms, compile {r['compile_s']:.1f} s, "
          f"temp {r['xla_temp_mb']:.0f} MB", flush=True)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(r) + "\n")
  md = table(rows)
  print(md)
  if args.out:
    cmd = " ".join(["python -m bench.knobs", *(argv if argv is not None else sys.argv[1:])])
    with open(args.out, "w") as f:
      f.write(f"Command: `{cmd}`\n\n{md}\n")
  return rows


if __name__ == "__main__":
  main()
