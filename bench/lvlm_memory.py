"""Per-device memory of a full-size LVLM train step, from XLA's own analysis, with nothing
allocated: the config's train step is compiled on a simulated CPU mesh for abstract arrays
(``jax.ShapeDtypeStruct`` with shardings) and ``compiled.memory_analysis()`` is read.

  python bench/lvlm_memory.py --config configs/lvlm_llava15_7b.py --devices 8 \\
      --out docs/results/lvlm_memory.md

Argument bytes are the sharded train state + batch a device holds; temp bytes XLA's scratch
(activations kept for the backward pass, gradients, collectives); output bytes alias the
donated state. CPU's compiler schedules differently from TPU/GPU's, so treat the total as an
estimate within tens of percent, not a guarantee.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any


def load(config_path: str, data_dir: str | None = None, sets: Sequence[str] = (),
         preferences_stub: bool = False) -> Any:
  """The config of ``config_path`` made compile-only: the (tiny) ``shapes_captions/small``
  dataset only feeds the host pipeline that gives the batch's shapes, no evals, no
  ``init_from``; ``sets``: ``KEY=VALUE`` overrides (values ``ast.literal_eval``-ed)."""
  from bigvl.config import load_config

  c = load_config(config_path)
  c.input.dataset = "shapes_captions/small"
  c.input.data_dir = data_dir or tempfile.mkdtemp()
  c.evals = {}
  c.init_from = {}
  if preferences_stub:
    import json

    path = os.path.join(tempfile.mkdtemp(), "preferences.jsonl")
    with open(path, "w") as f:
      for i in range(256):
        f.write(json.dumps({"chosen": "a red circle", "rejected": "a blue square",
                            "chosen_score": 1.0, "rejected_score": 0.0,
                            "chosen_source": "sample", "rejected_source": "sample",
                            "image_index": i, "question": "description", "kind": "caption"})
                + "\n")
    c.input.preferences = path
  for kv in sets:
    key, value = kv.split("=", 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    c.update_from_flattened_dict({key: value})
  return c


def compile_abstract(c: Any, devices: list | None = None) -> dict[str, Any]:
  """Builds the run of config ``c`` on ``devices`` (default: all) and compiles its train step
  for abstract state and batch (``jax.ShapeDtypeStruct`` with the run's shardings; nothing is
  allocated). Returns ``{run, fns, compiled, batch, compile_s}``."""
  import jax

  from bigvl import parallel, train

  run = train.build(c, devices)
  # the batch's shapes from one host batch of the task's own pipeline (the tiny dataset,
  # resized to the config's image size): any task's batch layout works
  local = next(run.task.train_data(run.seed))
  sh = parallel.batch_sharding(run.mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), local)
  t0 = time.perf_counter()
  fns = train.compile_run(run, batch)
  compiled = fns.step.lower(fns.abstract_state, batch).compile()
  return {"run": run, "fns": fns, "compiled": compiled, "batch": batch,
          "compile_s": time.perf_counter() - t0}


def nbytes(tree: Any) -> int:
  """Bytes of every leaf of ``tree`` (arrays or ShapeDtypeStructs), all devices together."""
  import jax

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="configs/lvlm_llava15_7b.py")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--data_dir", default=None, help="where shapes_captions/small is prepared")
  ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides")
  ap.add_argument("--out", default=None)
  ap.add_argument("--preferences_stub", action="store_true",
                  help="DPO configs: write a stub preference file of long answers (the step's "
                       "shapes come from input.seq_len, not from the texts)")
  a = ap.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={a.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  c = load(a.config, a.data_dir, a.set, a.preferences_stub)
  out = compile_abstract(c)
  run, fns, compiled, batch, secs = (out[k] for k in ("run", "fns", "compiled", "batch",
                                                      "compile_s"))
  b = c.input.batch_size
  shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
  m = compiled.memory_analysis()
  state = fns.abstract_state

  gib = 2 ** 30
  n_dev = run.mesh.size
  rows = [
      ("parameters, frozen (all devices)", nbytes(state["frozen"]) / gib),
      ("parameters, trainable (all devices)", nbytes(state["params"]) / gib),
      ("optimizer state (all devices)", nbytes(state["opt_state"]) / gib),
      ("XLA argument bytes per device", m.argument_size_in_bytes / gib),
      ("XLA temp bytes per device", m.temp_size_in_bytes / gib),
      ("XLA output bytes per device (aliased: donated state)", m.output_size_in_bytes / gib),
      ("XLA alias bytes per device", m.alias_size_in_bytes / gib),
  ]
  peak = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes) / gib
  lines = [f"# {os.path.basename(a.config)}: train-step memory from XLA's analysis", "",
           f"Command: `python bench/lvlm_memory.py --config {a.config} --devices {a.devices}"
           f"{''.join(' --set ' + kv for kv in a.set)}"
           f"{' --preferences_stub' if a.preferences_stub else ''} --data_dir DIR`", "",
           f"Mesh {dict(run.mesh.shape)} ({n_dev} simulated CPU devices); global batch {b} in "
           f"{run.microbatches} microbatch(es): {shapes}; LoRA rank {c.model.lora.rank}; "
           f"model dtype "
           f"{c.model.dtype}, parameters stored float32; compile {secs:.0f} s.", "",
           "| quantity | GiB |", "|---|---:|"]
  lines += [f"| {name} | {v:.2f} |" for name, v in rows]
  lines += [f"| **peak per device (argument + temp + output - alias)** | **{peak:.2f}** |", ""]
  text = "\n".join(lines)
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
