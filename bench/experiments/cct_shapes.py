"""Semi-supervised segmentation of ``shapes_segmentation``: Cross-Consistency Training against
the supervised-only baseline (same network, labeled images, steps and seed), with an ablation
over the perturbation types.

  python bench/experiments/cct_shapes.py --data_dir DIR [--seeds 0 1 2] \\
      [--out docs/results/cct_shapes.md] [--extra=--config.key=value ...]

Every run is ``python -m bigvl.main --config configs/cct_shapes.py:tiny,<arm>`` (reused when
the same command already finished with the same code); the seed also draws the labeled subset,
so each seed's arms share their labeled images. The table gives test mIoU and pixel accuracy
(mean ± std over seeds), per-class IoU, and each arm's paired difference to the baseline.
"""

from __future__ import annotations

import numpy as np
from _runs import arm_sweep_args, code_version, extra_flags, run_config  # bench/experiments/
from _table import class_cells, mean_std, paired, write_lines  # bench/experiments/

ARMS = [("supervised only", "supervised"),
        ("CCT, all 7 perturbations", "aux=all"),
        ("CCT, feature-based (I-VAT, DropOut, F-Drop, F-Noise)", "aux=feature"),
        ("CCT, prediction-based (G-Cutout, Con-Msk, Obj-Msk)", "aux=prediction"),
        ("CCT, I-VAT only", "aux=vat"),
        ("CCT, F-Noise only", "aux=feature_noise")]
CLASSES = ("background", "circle", "square", "triangle", "star")


def main() -> None:
  ap = arm_sweep_args("cct_shapes")
  a = ap.parse_args()
  code = code_version()
  arms = [arm for arm in ARMS if a.arms is None or arm[1] in a.arms]
  res = {}
  for label, arg in arms:
    res[label] = [run_config(a.root, arg.replace("=", "-"), f"cct_shapes.py:tiny,{arg}", s,
                             code, [f"--config.input.data_dir={a.data_dir}", *a.extra])
                  for s in a.seeds]
  base = ARMS[0][0]
  get = {label: {k: np.array([r[f"test/{k}"] for r in rs]) for k in ("miou", "pixel_accuracy")}
         for label, rs in res.items()}
  extra = extra_flags(a.extra)
  lines = [f"# Cross-Consistency Training on shapes_segmentation ({len(a.seeds)} seeds, {code})",
           "", f"Command: `python bench/experiments/cct_shapes.py --data_dir DIR --seeds "
           f"{' '.join(map(str, a.seeds))}{extra}`", "",
           "`configs/cct_shapes.py:tiny,<arm>`: 200 of the 4,000 train images labeled (5%, "
           "drawn by the seed), the other 3,800 unlabeled; a dilated ResNet (3 basic blocks, "
           "width 16, output stride 4) + PSP (bins 1, 2, 4) and pixel-shuffle decoders (32 "
           "channels) at 32x32; 1,500 steps of 16 labeled (+ 16 unlabeled) images; one "
           "auxiliary decoder per chosen perturbation; unsupervised weight 30 ramped over the "
           "first 10%. "
           "Test split: 500 images, mIoU and pixel accuracy in %, mean ± std over seeds.", "",
           "| arm | mIoU | pixel acc. | mIoU - supervised | " +
           " | ".join(f"IoU {c}" for c in CLASSES) + " |",
           "|---|---:|---:|---:|" + "---:|" * len(CLASSES)]
  for label, _ in arms:
    gap = "" if label == base or base not in get else paired(get[label]["miou"],
                                                             get[base]["miou"])
    lines.append(f"| {label} | {mean_std(get[label]['miou'])} | "
                 f"{mean_std(get[label]['pixel_accuracy'])} | {gap} | " +
                 class_cells(res[label], CLASSES) + " |")
  lines += ["", "Paired differences: mean ± std of (arm - supervised) over seeds, in brackets "
            "the seeds where the arm is ahead."]
  write_lines(lines, a.out)


if __name__ == "__main__":
  main()
