"""Few-shot classification of unseen ``shapes_fewshot`` classes: Spatial Contrastive Learning
(CE + spatial SupCon) against the cross-entropy baseline (same backbone, views, steps, optimizer
and seed), 5-way 1-shot and 5-shot.

  python bench/experiments/scl_shapes.py --data_dir DIR [--seeds 0 1 2] \\
      [--out docs/results/scl_shapes.md] [--extra=--config.key=value ...]

Every run is ``python -m bigvl.main --config configs/scl_shapes.py:cpu,<arm>`` (reused when the
same command already finished with the same code). Each run is evaluated on the same 600
episodes per shot count (the episode sampler is seeded independently of the model), so the
per-seed differences are paired on the episodes too. The table gives, per arm, the mean ± std
over seeds of the episode accuracy, each seed's 95% confidence interval half-width (mean over
seeds) and the paired difference to the baseline.
"""

from __future__ import annotations

import numpy as np
from _runs import arm_sweep_args, code_version, extra_flags, run_config  # bench/experiments/
from _table import mean_std, paired, write_lines  # bench/experiments/

ARMS = [("CE only (baseline)", "ce"),
        ("CE + SCL (spatial)", "scl"),
        ("CE + SCL (spatial + global)", "global_weight=1.0")]
SHOTS = (1, 5)


def main() -> None:
  ap = arm_sweep_args("scl_shapes")
  a = ap.parse_args()
  code = code_version()
  arms = [arm for arm in ARMS if a.arms is None or arm[1] in a.arms]
  res = {}
  for label, arg in arms:
    cfg = "scl_shapes.py:cpu" + ("" if arg == "scl" else f",{arg}")
    res[label] = [run_config(a.root, arg.replace("=", "-"), cfg, s, code,
                             [f"--config.input.data_dir={a.data_dir}", *a.extra])
                  for s in a.seeds]
  base = ARMS[0][0]

  def get(label, what, k):
    return np.array([r[f"fewshot/{what}_5way_{k}shot"] for r in res[label]])

  extra = extra_flags(a.extra)
  arms_flag = f" --arms {' '.join(a.arms)}" if a.arms else ""
  head = " | ".join(f"{k}-shot | ±CI95 | {k}-shot - CE" for k in SHOTS)
  lines = [f"# SCL vs cross-entropy on shapes_fewshot ({len(a.seeds)} seeds, {code})", "",
           f"Command: `python bench/experiments/scl_shapes.py --data_dir DIR --seeds "
           f"{' '.join(map(str, a.seeds))}{arms_flag}{extra}`", "",
           "`configs/scl_shapes.py:cpu,<arm>`: pre-training on the 60 base classes of "
           "`shapes_fewshot` (600 images each, 32x32), ResNet-12 of widths 16-32-64-128 (no "
           "pooling after the last block: 4x4 maps; DropBlock 0.1 ramped over 750 steps), 2 "
           "views per image (flip + random crop), batch 32 images, 1,000 steps of SGD "
           "(momentum 0.9, lr 0.05, cosine, wd 5e-4); SCL: CE + spatial SupCon, weights 1 / 1, "
           "temperature 0.1. Test: 600 episodes of 5 of the 20 unseen test classes, 15 queries "
           "per class, logistic regression on the L2-normalised global (pooled) and spatial "
           "(map max-pooled to 2x2) features, probabilities summed. Accuracy in %, mean ± std "
           "over seeds; ±CI95: the 95% confidence half-width of one seed's 600 episodes (mean "
           "over seeds).", "",
           f"| arm | {head} |", "|---|" + "---:|---:|---:|" * len(SHOTS)]
  for label, _ in arms:
    cells = []
    for k in SHOTS:
      acc = get(label, "acc", k)
      gap = "" if label == base or base not in res else paired(acc, get(base, "acc", k))
      cells += [mean_std(acc), f"{100 * get(label, 'ci95', k).mean():.2f}", gap]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines += ["", "Paired differences: mean ± std of (arm - CE) over seeds (same seed, same "
            "episodes), in brackets the seeds where the arm is ahead."]
  write_lines(lines, a.out)


if __name__ == "__main__":
  main()
