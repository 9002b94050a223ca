"""Per-device memory of full-size train steps as the mesh grows, from XLA's own analysis,
with nothing allocated.

  python -m bench.scaling_memory [--devices 8,64] [--models llava7b_lora,llava7b_full,b16] \\
      [--data_dir DIR] [--out bench/scaling_memory.md] [--json F]

One process simulates ``max(--devices)`` CPU devices (``--xla_force_host_platform_device_count``,
set before jax is imported: run this as a script or module); each row builds its mesh over
the first N of them (``train.build(config, devices)``), lowers and compiles the config's
train step for abstract state and batch (``jax.ShapeDtypeStruct`` with the run's shardings,
``bench.lvlm_memory.compile_abstract``) and reads ``compiled.memory_analysis()``:

* ``args``: the train state shard + batch shard a device holds (the step's inputs);
* ``temp``: XLA's scratch (activations kept for the backward, gradients, gathered weights,
  collective buffers); ``out``: the new state + metrics; ``alias``: outputs that reuse the
  donated inputs' buffers; ``peak ~ args + temp + out - alias``.

Analytic check of ``args``. Parameter ``p`` of ``P_p`` values stored in ``b_p`` bytes, with
AdamW's two moments if trainable (``m_p = 2``, else 0), on a mesh whose ``fsdp`` axis has
size ``F``:

  naive  = sum_p P_p b_p (1 + m_p) / F  +  batch bytes / (data * fsdp)
  shards = sum over every state leaf of its shard's bytes (``sharding.shard_shape``)
           + batch bytes / (data * fsdp)

``naive`` is the formula FSDP promises (every parameter and moment split ``F`` ways;
replicated over ``data``); ``shards`` counts what the shardings actually do (LayerNorm
scales, biases and any dimension the mesh does not divide stay replicated). ``shards``
should equal XLA's argument bytes; ``naive`` is within a few percent while the replicated
part is small.

Rows. ``llava7b_lora``: ``configs/lvlm_llava15_7b.py`` as configured (LoRA rank 128 on the
LM, projector trained, vision tower and LM frozen: 26 GiB of frozen float32 weights, no
moments); ``llava7b_full``: the same model fine-tuned fully (projector + LM trainable,
LoRA off; vision frozen). Both keep 4 rows a device per microbatch: global batch 128 in 4
microbatches on 8 devices, 256 in 1 on 64. ``b16``: ``configs/siglip_shapes.py:size=b16``
(ViT-B/16 image and text towers, 224 px, 32k vocabulary), global batch 256, float32.
Meshes: ``{fsdp: N}`` and ``{data: D, fsdp: N/D}`` (``D = 2`` on 8 devices, 8 on 64).
CPU's compiler schedules differently from TPU/GPU's: ``temp`` is an estimate within tens
of percent; ``args`` is exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

GIB = 2 ** 30

#: name -> (config file, KEY=VALUE overrides for every row, a fn(devices) -> overrides).
MODELS: dict[str, tuple[str, list[str], Any]] = {
    "llava7b_lora": ("configs/lvlm_llava15_7b.py", [],
                     lambda n: [f"input.batch_size={4 * n * max(1, 32 // n)}",
                                f"microbatches={max(1, 32 // n)}"]),
    "llava7b_full": ("configs/lvlm_llava15_7b.py",
                     ["model.lora.rank=0", "model.trainable=^(projector|lm)/"],
                     lambda n: [f"input.batch_size={4 * n * max(1, 32 // n)}",
                                f"microbatches={max(1, 32 // n)}"]),
    "b16": ("configs/siglip_shapes.py:size=b16", ["input.batch_size=256"], lambda n: []),
}


def meshes(n: int) -> list[dict[str, int]]:
  """``{fsdp: n}`` and ``{data: D, fsdp: n / D}`` (``D = 2`` for n <= 8, else 8)."""
  d = 2 if n <= 8 else 8
  return [{"data": 1, "fsdp": n, "tensor": 1}, {"data": d, "fsdp": n // d, "tensor": 1}]


def analytic(state: Any, batch: Any, mesh: Any) -> dict[str, float]:
  """Per-device bytes: ``naive`` and ``shards`` of the module doc, and ``batch``."""
  import jax

  from bench.lvlm_memory import nbytes

  data_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_b = nbytes(batch) / data_shards
  params = nbytes(state["params"]) + nbytes(state["frozen"])
  moments = 2 * nbytes(state["params"])  # AdamW: mu and nu per trainable parameter
  naive = (params + moments) / mesh.shape["fsdp"] + batch_b
  shards = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(state)) + batch_b
  return {"naive": naive, "shards": shards, "batch": batch_b,
          "params_total": params, "trainable_total": nbytes(state["params"])}


def measure(config: Any, devices: list) -> dict[str, Any]:
  """Compiles ``config``'s step on ``devices`` (abstract arrays) -> XLA's memory analysis and
  the analytic state bytes, per device."""
  from bench.lvlm_memory import compile_abstract

  out = compile_abstract(config, devices)
  run, m = out["run"], out["compiled"].memory_analysis()
  xla = {"args": m.argument_size_in_bytes, "temp": m.temp_size_in_bytes,
         "out": m.output_size_in_bytes, "alias": m.alias_size_in_bytes}
  xla["peak"] = xla["args"] + xla["temp"] + xla["out"] - xla["alias"]
  return {"mesh": dict(run.mesh.shape), "devices": run.mesh.size,
          "batch": int(config.input.batch_size), "microbatches": run.microbatches,
          "compile_s": out["compile_s"], "xla": xla,
          "analytic": analytic(out["fns"].abstract_state, out["batch"], run.mesh)}


def format_table(rows: list[dict[str, Any]]) -> str:
  head = ("| model | devices | mesh (data x fsdp) | batch (microbatches) | analytic naive "
          "| analytic shards | XLA args | XLA temp | XLA out | XLA alias | **peak** "
          "| args / naive | compile s |\n"
          "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  lines = [head]
  for r in rows:
    a, x = r["analytic"], r["xla"]
    g = lambda v: f"{v / GIB:.2f}"
    lines.append(
        f"| {r['model']} | {r['devices']} | {r['mesh']['data']} x {r['mesh']['fsdp']} | "
        f"{r['batch']} ({r['microbatches']}) | {g(a['naive'])} | {g(a['shards'])} | "
        f"{g(x['args'])} | {g(x['temp'])} | {g(x['out'])} | {g(x['alias'])} | "
        f"**{g(x['peak'])}** | {x['args'] / a['naive']:.3f} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", default="8,64")
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--meshes", default="all", choices=("all", "fsdp"),
                 help="fsdp: only the {fsdp: N} mesh")
  p.add_argument("--data_dir", default=None, help="where shapes_captions/small is prepared")
  p.add_argument("--out", default=None, help="write the markdown table here")
  p.add_argument("--json", default=None, help="append each row as a JSON line here")
  args = p.parse_args(argv)
  counts = [int(n) for n in args.devices.split(",")]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={max(counts)}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import logging
  import tempfile

  import jax

  from bench.lvlm_memory import load
  from bigvl.data import sources

  logging.basicConfig(level=logging.ERROR)
  data_dir = args.data_dir or tempfile.mkdtemp()
  sources.tfds_builder("shapes_captions/small", data_dir)
  rows = []
  t_all = time.perf_counter()
  for name in args.models.split(","):
    path, sets, per_n = MODELS[name]
    for n in counts:
      for mesh in meshes(n)[:1 if args.meshes == "fsdp" else None]:
        mesh_sets = [f"mesh.{k}={v}" for k, v in mesh.items()]
        c = load(path, data_dir, [*sets, *per_n(n), *mesh_sets])
        r = {"model": name, **measure(c, jax.devices()[:n])}
        rows.append(r)
        print(format_table([r]).splitlines()[-1], flush=True)
        if args.json:
          with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
  table = format_table(rows)
  print(table)
  if args.out:
    cmd = " ".join(["python -m bench.scaling_memory",
                    *(argv if argv is not None else sys.argv[1:])])
    with open(args.out, "w") as f:
      f.write(f"# Per-device train-step memory as the mesh grows (XLA memory analysis)\n\n"
              f"Command: `{cmd}` ({time.perf_counter() - t_all:.0f} s in all on a 2-core "
              f"CPU)\n\nGiB per device.\n\n{table}\n")
  return rows


if __name__ == "__main__":
  main()
