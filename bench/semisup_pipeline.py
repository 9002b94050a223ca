"""Host throughput of the semisup two-stream grain pipeline (augmentation included).

  nice -n 5 env PYTHONPATH=. python bench/semisup_pipeline.py --steps 40 --threads 1,2

Builds ``configs/semisup_mnist.py:<method>`` (full size: labeled batch 64, FixMatch mu 7) and
times ``next(task.train_data(0))`` -- exactly what the train loop pulls -- for a few read-thread
counts (``input.num_threads``). Prints a markdown table of steps/s and images/s (every view
of every example counts as an image).
"""

from __future__ import annotations

import argparse
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(method: str, threads: int, steps: int) -> tuple[float, int]:
  from bigvl import train
  from bigvl.config import load_sibling

  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "semisup_mnist").get_config(method)
  c.input.num_threads = threads
  task = train.build(c).task
  data = task.train_data(0)
  batch = next(data)  # warm-up: threads started, prefetch buffer filling
  images = sum(len(b["image"]) * (b["image"].shape[1] if b["image"].ndim == 5 else 1)
               for b in batch.values())
  t0 = time.perf_counter()
  for _ in range(steps):
    next(data)
  return steps / (time.perf_counter() - t0), images


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--methods", default="fixmatch,mean_teacher,supervised")
  ap.add_argument("--threads", default="1,2")
  ap.add_argument("--steps", type=int, default=40)
  args = ap.parse_args()
  print("| method | read threads | images / step | steps/s | images/s |")
  print("|---|---:|---:|---:|---:|")
  for method in args.methods.split(","):
    for threads in (int(t) for t in args.threads.split(",")):
      rate, images = measure(method, threads, args.steps)
      print(f"| {method} | {threads} | {images} | {rate:.1f} | {rate * images:,.0f} |",
            flush=True)


if __name__ == "__main__":
  main()
