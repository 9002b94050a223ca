"""Wall time of supervised LFA (``bigvl.tasks.lfa.fit``) on precomputed features.

Usage: ``python bench/lfa_speed.py [--n 10000] [--dim 512] [--classes 100] [--unsupervised]``.
Synthetic features (class embeddings = random unit vectors; image features = a random
near-identity rotation of their class's embedding plus noise), default LFA config (beta CV over
25 values x 3 splits, 200 refinement steps on 75 % of the samples). Prints the time of the
first call (including jit compilation) and of a second call (compiled), and the accuracies.
The refinement's floor is its matmuls: 200 steps x (x_b W and x_b^T dL/dz), 7,500 x 512 x 512
each, about 1.6 TFLOP in float32.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from scipy.linalg import expm

from bigvl.tasks import lfa


def synthetic(n: int, dim: int, classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  t = lfa.normalize(rng.normal(size=(classes, dim)))
  a = rng.normal(size=(dim, dim))
  rot = expm(1.75 * (a - a.T) / np.sqrt(2 * dim)).astype(np.float32)
  y = np.arange(n) % classes
  x = lfa.normalize((t[y] + 1.5 * lfa.normalize(rng.normal(size=(n, dim)))) @ rot)
  return x, y, t


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--n", type=int, default=10_000)
  ap.add_argument("--dim", type=int, default=512)
  ap.add_argument("--classes", type=int, default=100)
  ap.add_argument("--unsupervised", action="store_true", help="also time fit_unsupervised")
  ap.add_argument("--max_batch", type=int, default=0, help="LFAConfig.max_batch (0: official)")
  args = ap.parse_args()
  x, y, t = synthetic(args.n, args.dim, args.classes)
  print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} (other jobs slow this down, numpy's SVD most); "
        f"N={args.n} D={args.dim} C={args.classes}")
  print(f"zero-shot accuracy {lfa.accuracy(x, y, None, t):.3f}")
  for call in ("first (with compile)", "second"):
    t0 = time.perf_counter()
    w, info = lfa.fit(x, y, t, lfa.LFAConfig(max_batch=args.max_batch), return_info=True)
    dt = time.perf_counter() - t0
    print(f"fit {call}: {dt:.2f} s, beta={info['beta']:.3f}, "
          f"train accuracy {lfa.accuracy(x, y, w, t):.3f}")
  t0 = time.perf_counter()
  beta = lfa.choose_beta(x, y, t)
  w0 = lfa.blend(lfa.procrustes(x, t[y]), beta)
  print(f"  of which beta CV + Procrustes: {time.perf_counter() - t0:.2f} s")
  t0 = time.perf_counter()
  lfa.refine(w0, x, y, t, lfa.LFAConfig(max_batch=args.max_batch))
  print(f"  of which refinement (200 steps): {time.perf_counter() - t0:.2f} s")
  if args.unsupervised:
    t0 = time.perf_counter()
    w = lfa.fit_unsupervised(x, t)
    print(f"fit_unsupervised: {time.perf_counter() - t0:.2f} s, "
          f"accuracy {lfa.accuracy(x, y, w, t):.3f}")


if __name__ == "__main__":
  main()
