"""How flawed ``shapes_captions/dups`` batches are: false-negative pairs per batch of 128.

  python bench/experiments/fff_data_stats.py [--batches 50] [--batch 128] [--dataset D]

Counts, over random train batches, the pairs of images of the same scene (jittered copies of one
prototype), how many of those share a caption, and the pairs of *different* scenes with an
identical caption (e.g. two lone red circles: "a red circle" is true of both). Under the
one-positive SigLIP target every such pair is a negative. Also: the share of test images whose
captions no other test image has.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bigvl.data import sources  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", type=int, default=50)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--dataset", default="shapes_captions/dups",
                  help="shapes_captions/equiv: scene_id is the concept, so same-scene pairs "
                       "are the equivalent pairs")
  args = ap.parse_args()
  train, _ = sources.get_source(args.dataset, "train", args.data_dir)
  n = len(train)
  scene = np.array([train[i]["scene_id"] for i in range(n)])
  caps = [frozenset(train[i]["captions"]) for i in range(n)]
  rng = np.random.default_rng(0)
  same, same_cap, other_cap = [], [], []
  off_diag = ~np.eye(args.batch, dtype=bool)
  for _ in range(args.batches):
    idx = rng.choice(n, args.batch, replace=False)
    s = scene[idx]
    is_same = (s[:, None] == s[None, :]) & off_diag
    share = np.array([[bool(caps[a] & caps[b]) for b in idx] for a in idx]) & off_diag
    same.append(is_same.sum() / 2)
    same_cap.append((is_same & share).sum() / 2)
    other_cap.append((~is_same & share).sum() / 2)
  test, _ = sources.get_source(args.dataset, "test", args.data_dir)
  tcaps = [frozenset(test[i]["captions"]) for i in range(len(test))]
  count = collections.Counter(c for cs in tcaps for c in cs)
  unique = np.mean([all(count[c] == 1 for c in cs) for cs in tcaps])
  print(f"train: {n} images, {100 * np.mean(np.bincount(scene)[scene] > 1):.1f}% have a "
        f"near duplicate in the split")
  print(f"per batch of {args.batch} (mean of {args.batches}): {np.mean(same):.1f} same-scene "
        f"pairs ({np.mean(same_cap):.1f} share a caption), {np.mean(other_cap):.1f} "
        f"different-scene pairs with an identical caption")
  print(f"test: {len(test)} images, {100 * unique:.1f}% with captions no other test image has")


if __name__ == "__main__":
  main()
