"""XLA:CPU's matmuls against PyTorch's on the shapes of one SigLIP step, in the three forms
a dense layer runs: the forward ``y = x W``, the input gradient ``dx = g W^T`` and the weight
gradient ``dW = x^T g``.

  python -m bench.gemm [--size s16] [--batch 32] [--dtypes float32,bfloat16] [--reps 7]

For each Dense of the towers (``q/k/v/out``: ``D -> D``; ``fc1``: ``D -> 4D``; ``fc2``: ``4D
-> D``) on the image (``B * 196`` rows) and text (``B * 64`` rows) tokens, each form is timed
as a jitted ``lax.dot_general`` with the operands in the layout autodiff hands it (``W^T`` and
``x^T`` as transposed dimension numbers, not copies) and as ``torch.mm`` on the same
(transposed-view) operands, both with all of the machine's threads; bf16 is bf16 operands
with a float32 result in JAX and ``torch.autocast`` in PyTorch. Printed: GFLOP/s per form
and the milliseconds one S16 step spends in each (``count`` layers x the form's time), so the
gap of the whole step to PyTorch's dense layers can be read off in ms.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench._timing import median_seconds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shapes(size: str, batch: int) -> list[tuple[str, int, int, int, int]]:
  """``(name, M, K, N, count per step)`` of the towers' dense layers."""
  sys.path.insert(0, REPO)
  from configs.siglip_shapes import SIZES

  width, depth, _ = SIZES[size]
  out = []
  for tower, tokens in (("image", batch * (224 // 16) ** 2), ("text", batch * 64)):
    out += [(f"{tower} qkv/out {width}->{width}", tokens, width, width, 4 * depth),
            (f"{tower} fc1 {width}->{4 * width}", tokens, width, 4 * width, depth),
            (f"{tower} fc2 {4 * width}->{width}", tokens, 4 * width, width, depth)]
  return out


def time_jax(m: int, k: int, n: int, dtype: str, reps: int) -> dict[str, float]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  r = np.random.default_rng(0)
  dt = jnp.dtype(dtype)
  x = jnp.asarray(r.standard_normal((m, k)), dt)
  w = jnp.asarray(r.standard_normal((k, n)), dt)
  g = jnp.asarray(r.standard_normal((m, n)), dt)
  f32 = jnp.float32
  forms = {
      "fwd": (lambda a, b: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                               preferred_element_type=f32), (x, w)),
      "dx": (lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                              preferred_element_type=f32), (g, w)),
      "dW": (lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                              preferred_element_type=f32), (x, g)),
  }
  out = {}
  for name, (f, args) in forms.items():
    jf = jax.jit(f)
    out[name] = median_seconds(lambda jf=jf, args=args: jf(*args).block_until_ready(), reps)
  return out


def time_torch(m: int, k: int, n: int, dtype: str, reps: int) -> dict[str, float]:
  import contextlib

  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  x, w, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
  cast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
          else contextlib.nullcontext())
  forms = {"fwd": (x, w), "dx": (g, w.t()), "dW": (x.t(), g)}
  out = {}
  with cast, torch.no_grad():
    for name, (a, b) in forms.items():
      out[name] = median_seconds(lambda a=a, b=b: torch.mm(a, b), reps)
  return out


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="s16")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--reps", type=int, default=7)
  args = p.parse_args(argv)
  print(f"dense-layer matmuls of one {args.size.upper()} step, batch {args.batch}, "
        f"{os.cpu_count()} threads\n")
  print("| dtype | layer | M x K x N | count | form | JAX GFLOP/s | torch GFLOP/s | "
        "JAX ms/step | torch ms/step |")
  print("|---|---|---|---:|---|---:|---:|---:|---:|")
  for dtype in args.dtypes.split(","):
    tot = {"jax": 0.0, "torch": 0.0}
    for name, m, k, n, count in shapes(args.size, args.batch):
      tj = time_jax(m, k, n, dtype, args.reps)
      tt = time_torch(m, k, n, dtype, args.reps)
      for form in ("fwd", "dx", "dW"):
        fl = 2 * m * k * n
        tot["jax"] += count * tj[form]
        tot["torch"] += count * tt[form]
        print(f"| {dtype} | {name} | {m} x {k} x {n} | {count} | {form} | "
              f"{fl / tj[form] / 1e9:.0f} | {fl / tt[form] / 1e9:.0f} | "
              f"{1e3 * count * tj[form]:.0f} | {1e3 * count * tt[form]:.0f} |", flush=True)
    print(f"| {dtype} | **all dense layers** | | | | | | **{1e3 * tot['jax']:.0f}** | "
          f"**{1e3 * tot['torch']:.0f}** |", flush=True)


if __name__ == "__main__":
  main()
