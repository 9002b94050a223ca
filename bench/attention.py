"""One attention layer's core, forward + backward, three ways on the same CPU:
``flax.linen.dot_product_attention`` under autodiff, bigvl's
(:mod:`bigvl.models.attention`: ``(B, H)``-leading products, hand-written backward) and
PyTorch's ``scaled_dot_product_attention`` (its fused CPU kernel).

  python -m bench.attention [--batch 32] [--length 196] [--heads 6] [--head_dim 64] [--reps 9]

Each is ``sum(attention(q, k, v) ** 2)`` differentiated w.r.t. ``q, k, v`` (float32,
``[B, L, H, d]``), the median of ``--reps`` calls after one warm-up; the defaults are one
ViT-S/16 layer at 224 px with batch 32. Printed: milliseconds and the relative difference of
bigvl's gradients from flax's.
"""

from __future__ import annotations

import argparse
import os

from bench._timing import median_seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--length", type=int, default=196)
  p.add_argument("--heads", type=int, default=6)
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--reps", type=int, default=9)
  a = p.parse_args(argv)
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from bigvl.models import attention

  shape = (a.batch, a.length, a.heads, a.head_dim)
  r = np.random.default_rng(0)
  q, k, v = (jnp.asarray(r.standard_normal(shape), jnp.float32) for _ in range(3))

  def grads(fn):
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))

  out = {}
  ref = None
  for name, fn in (("flax dot_product_attention (autodiff)", nn.dot_product_attention),
                   ("bigvl.models.attention", attention.dot_product_attention)):
    g = grads(fn)
    out[name] = 1e3 * median_seconds(lambda g=g: jax.block_until_ready(g(q, k, v)), a.reps)
    got = g(q, k, v)
    if ref is None:
      ref = got
    err = max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
              for x, y in zip(got, ref, strict=True))
    print(f"{name}: {out[name]:.1f} ms (max relative difference from flax {err:.1e})")

  torch.set_num_threads(os.cpu_count() or 1)
  tq, tk, tv = (torch.tensor(np.asarray(x)).transpose(1, 2).contiguous().requires_grad_()
                for x in (q, k, v))

  def torch_step():
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    (o ** 2).sum().backward()

  name = f"torch {torch.__version__} scaled_dot_product_attention"
  out[name] = 1e3 * median_seconds(torch_step, a.reps)
  print(f"{name}: {out[name]:.1f} ms")
  return out


if __name__ == "__main__":
  main()
