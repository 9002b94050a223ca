"""The supervised term and the weighted consistency term over training, from a sweep's runs.

  python bench/experiments/semisup_curves.py docs/results/semisup_mnist.jsonl \\
      --arms supervised+perturb=paper pi_model temporal_ensembling mean_teacher \\
      --out docs/results/semisup_mnist_terms.png

Reads the per-run rows ``bench/experiments/semisup_mnist.py`` writes (each holds its logged
``curve``: ``sup_loss``, ``unsup_loss``, ``w_u`` every ``steps / 30`` steps) and draws, per arm,
the labeled cross-entropy ``CE`` and the weighted unlabeled term ``w(t) L_u`` against the
step (mean over seeds, the seeds' range shaded), the baseline's ``CE`` drawn in every panel for
reference. Prints the same numbers at a few steps as a markdown table (``--table``).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def load(path: str, arms: list[str]) -> dict[str, list[dict]]:
  by: dict[str, list[dict]] = {a: [] for a in arms}
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      if r["method"] in by and r.get("curve"):
        by[r["method"]].append(r["curve"])
  return {a: rs for a, rs in by.items() if rs}


def terms(curves: list[dict]) -> dict[str, np.ndarray]:
  """``step [T]``, ``sup [S, T]``, ``weighted [S, T]`` (``w_u * unsup_loss``; zeros without an
  unlabeled term) over the seeds' curves (truncated to the shortest)."""
  t = min(len(c["step"]) for c in curves)
  sup = np.array([c["sup_loss"][:t] for c in curves])
  if "unsup_loss" in curves[0]:
    weighted = np.array([np.multiply(c["w_u"][:t], c["unsup_loss"][:t]) for c in curves])
  else:
    weighted = np.zeros_like(sup)
  return {"step": np.asarray(curves[0]["step"][:t]), "sup": sup, "weighted": weighted}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("jsonl")
  ap.add_argument("--arms", nargs="+", required=True)
  ap.add_argument("--baseline", default=None, help="the arm whose CE every panel shows "
                  "(default: the first arm)")
  ap.add_argument("--out", required=True)
  ap.add_argument("--table", action="store_true")
  args = ap.parse_args()
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = load(args.jsonl, args.arms)
  base = terms(runs[args.baseline or args.arms[0]])
  panels = [a for a in args.arms if a in runs and a != (args.baseline or args.arms[0])]
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), sharey=True,
                           squeeze=False)
  rows = []
  for ax, arm in zip(axes[0], panels, strict=True):
    tm = terms(runs[arm])
    for key, label, color in (("sup", "CE (labeled)", "C0"),
                              ("weighted", "w(t) L_u (unlabeled)", "C3")):
      v = tm[key]
      ax.plot(tm["step"], v.mean(0), color=color, label=label)
      ax.fill_between(tm["step"], v.min(0), v.max(0), color=color, alpha=0.2)
    ax.plot(base["step"], base["sup"].mean(0), color="0.4", ls="--",
            label=f"CE of {args.baseline or args.arms[0]}")
    ax.set_title(f"{arm} ({len(runs[arm])} seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    for i in np.linspace(0, len(tm["step"]) - 1, 5).astype(int):
      rows.append(f"| {arm} | {tm['step'][i]} | {tm['sup'][:, i].mean():.3f} | "
                  f"{tm['weighted'][:, i].mean():.3f} |")
  axes[0][0].set_ylabel("loss term (mean over seeds)")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f"wrote {args.out}")
  if args.table:
    print("| arm | step | CE (labeled) | w(t) L_u |\n|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
  main()
