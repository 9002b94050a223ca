"""How well a frozen teacher's cosines find the false negatives of ``shapes_captions/equiv``.

  python bench/experiments/fff_teacher_pr.py TEACHER_WORKDIR [--num 1024] [--min_precision 0.9]

FFF mines a pair as positive when a similarity of the pair is above a threshold
(``bigvl/losses/mining.py``): ``tt`` (a caption of image i and a caption of image j, cosine
>= thr_tt) and ``ii`` (images i and j, cosine >= thr_ii). ``equiv`` knows the truth: i and j
are equivalent iff they render the same scene graph (``concept``). On the first ``--num``
train images (i.i.d. draws from the concept pool, so same-concept pairs are as rare as in a
training batch) and their 5 captions each, this prints, per threshold, the precision and
recall of each test over the pairs of *different* images, and the expected mined pairs per
image in a batch of 128, then the threshold each test gets: the lowest one (the most recall)
whose precision is at least ``--min_precision``; and the mean cosine of same-concept and of
different-concept pairs (how crowded the embedding space is). Any finished two-tower run of
``equiv`` can be given (a student too: how its embeddings separate concepts). The teacher's
embeddings are the model's stop-gradient ones, as in training. ``--json``: the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runs import load_finished  # noqa: E402 (bench/experiments/_runs.py)

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)


def pair_stats(sims: np.ndarray, truth: np.ndarray, valid: np.ndarray,
               thresholds: tuple[float, ...]) -> list[dict]:
  """Per threshold: precision, recall and predicted positives of ``sims >= thr`` over the
  ``valid`` pairs against ``truth`` (all [P, Q] arrays)."""
  s, t = sims[valid], truth[valid]
  out = []
  for thr in thresholds:
    pred = s >= thr
    hits = float(np.sum(pred & t))
    out.append({"thr": thr, "precision": hits / max(float(pred.sum()), 1.0),
                "recall": hits / max(float(t.sum()), 1.0), "predicted": int(pred.sum())})
  return out


def choose(rows: list[dict], min_precision: float) -> dict | None:
  """The lowest threshold whose precision is >= ``min_precision`` (None if none is)."""
  ok = [r for r in rows if r["precision"] >= min_precision and r["predicted"] > 0]
  return min(ok, key=lambda r: r["thr"]) if ok else None


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("teacher")
  ap.add_argument("--num", type=int, default=1024)
  ap.add_argument("--min_precision", type=float, default=0.9)
  ap.add_argument("--batch", type=int, default=128, help="training batch, for pairs/image")
  ap.add_argument("--json", default=None)
  args = ap.parse_args()

  from bigvl.data import sources
  from bigvl.evaluators._embedding import Head

  run, step, state = load_finished(args.teacher)
  inp = run.config.input
  group_key = inp.get("group_key") or "concept"
  ev = dict((name, e) for name, e, _ in run.evaluators)["retrieval"]
  train_src, _ = sources.get_source(inp.dataset, "train", inp.get("data_dir"))
  source = Head(train_src, args.num)
  emb = ev.embedder.embed(state["params"], None, source=source)
  zimg, ztxt = emb["zimg"], emb["ztxt"]  # [N, E], [N, C, E]
  n, c, _ = ztxt.shape
  concept = np.array([np.asarray(source[i][group_key]).item() for i in range(n)])
  same = concept[:, None] == concept[None, :]
  other = ~np.eye(n, dtype=bool)

  sims_ii = zimg @ zimg.T
  ii = pair_stats(sims_ii, same, other, THRESHOLDS)
  flat = ztxt.reshape(n * c, -1)
  owner = np.repeat(np.arange(n), c)
  sims_tt, same_tt = flat @ flat.T, same[owner][:, owner]
  other_tt = owner[:, None] != owner[None, :]
  tt = pair_stats(sims_tt, same_tt, other_tt, THRESHOLDS)
  # How crowded the space is: mean cosine of pairs of the same / of different concepts.
  spread = {"ii_same": float(sims_ii[same & other].mean()),
            "ii_diff": float(sims_ii[~same].mean()),
            "tt_same": float(sims_tt[same_tt & other_tt].mean()),
            "tt_diff": float(sims_tt[~same_tt].mean())}
  per_image = (args.batch - 1) / (n - 1)  # pairs of one image in a batch / in the sample
  true_pairs = float(np.sum(same & other))
  print(f"teacher {args.teacher} (step {step}); {n} train images of {len(set(concept))} "
        f"concepts, {c} captions each; same-concept partners per image in a batch of "
        f"{args.batch}: {true_pairs / n * per_image:.2f}\n")
  print("mean cosine, same concept / different concepts: images "
        f"{spread['ii_same']:.3f} / {spread['ii_diff']:.3f}, captions {spread['tt_same']:.3f} / "
        f"{spread['tt_diff']:.3f}\n")
  print("| thr | ii precision | ii recall | ii mined / image | tt precision | tt recall |")
  print("|---:|---:|---:|---:|---:|---:|")
  for a, b in zip(ii, tt, strict=True):
    print(f"| {a['thr']:g} | {100 * a['precision']:.1f} | {100 * a['recall']:.1f} | "
          f"{a['predicted'] / n * per_image:.2f} | {100 * b['precision']:.1f} | "
          f"{100 * b['recall']:.1f} |")
  chosen = {"ii": choose(ii, args.min_precision), "tt": choose(tt, args.min_precision)}
  for name, row in chosen.items():
    if row is None:
      print(f"\nthr_{name}: no threshold reaches precision {args.min_precision}")
    else:
      print(f"\nthr_{name} = {row['thr']:g}: precision {100 * row['precision']:.1f}%, recall "
            f"{100 * row['recall']:.1f}% (lowest threshold with precision >= "
            f"{100 * args.min_precision:g}%)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"teacher": args.teacher, "step": step, "num": n, "ii": ii, "tt": tt,
                 "chosen": chosen, "mean_cos": spread}, f, indent=1)


if __name__ == "__main__":
  main()
