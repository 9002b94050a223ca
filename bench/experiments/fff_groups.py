"""Test R@1 of finished ``configs/fff_shapes.py`` runs, split by kind of test scene.

  python bench/experiments/fff_groups.py WORKDIR [WORKDIR ...]

Groups of the ``shapes_captions/dups`` test split (independent scenes): single-object scenes
(their captions, e.g. "a red circle", are shared by every test scene with the same lone object,
so their i2t R@1 is bounded by ties), multi-object scenes whose captions no other test scene
shares, and multi-object scenes sharing a caption with another. Prints markdown tables of
i2t / t2i R@1 per group (mean per setup, then per run), from each run's last checkpoint
(nothing is trained). Queries are ranked against the whole test split.
"""

from __future__ import annotations

import collections
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from _runs import load_finished  # noqa: E402 (bench/experiments/_runs.py)

from bigvl.evaluators.retrieval import retrieval_ranks  # noqa: E402


def groups(source) -> dict[str, np.ndarray]:
  caps = [tuple(c.decode() for c in source[i]["captions"]) for i in range(len(source))]
  count = collections.Counter(c for cs in caps for c in set(cs))
  shared = np.array([any(count[c] > 1 for c in cs) for cs in caps])
  single = np.array([any(c.startswith("a single ") for c in cs) for cs in caps])
  return {"all": np.ones(len(caps), bool), "single object": single,
          "multi, unique captions": ~single & ~shared, "multi, shared captions": ~single & shared}


def main() -> None:
  workdirs = sys.argv[1:]
  if not workdirs:
    sys.exit(__doc__)
  rows = []
  names = None
  by_setup: dict[str, list[list[tuple[float, float]]]] = collections.defaultdict(list)
  for wd in workdirs:
    run, step, state = load_finished(wd)
    config = run.config
    ev = dict((name, e) for name, e, _ in run.evaluators)["retrieval"]
    emb = ev.embedder.embed(state["params"])
    masks = groups(ev.embedder.source)
    names = list(masks)
    i2t, t2i = retrieval_ranks(emb["zimg"], emb["ztxt"])  # queries against the whole split
    t2i = t2i.reshape(len(i2t), -1)
    r1 = [(100 * np.mean(i2t[g] == 0), 100 * np.mean(t2i[g] == 0)) for g in masks.values()]
    cells = [f"{a:.1f} / {b:.1f} ({g.sum()})" for (a, b), g in zip(r1, masks.values(),
                                                                   strict=True)]
    m = config.loss.get("mining", {})
    source = m.get("source", "none")
    label = (f"K={config.input.captions_per_image}, mining={source}"
             + (", normalize" if source != "none" and m.get("normalize") else ""))
    by_setup[label].append(r1)
    rows.append(f"| {os.path.basename(wd.rstrip('/'))} | {label} | step {step} | "
                + " | ".join(cells) + " |")
  print("Mean over the runs of each setup, i2t / t2i R@1:\n")
  print("| setup | runs | " + " | ".join(names) + " |")
  print("|---|---:|" + "---:|" * len(names))
  for label, runs in by_setup.items():
    mean = np.mean(np.asarray(runs), axis=0)  # [groups, 2]
    print(f"| {label} | {len(runs)} | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in mean)
          + " |")
  print("\nPer run, i2t / t2i R@1 (test images in the group):\n")
  print("| run | setup | ckpt | " + " | ".join(names) + " |")
  print("|---|---|---|" + "---:|" * len(names))
  print("\n".join(rows))


if __name__ == "__main__":
  main()
