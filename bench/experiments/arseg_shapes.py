"""Unsupervised segmentation of ``shapes_segmentation/textures`` (each class a fill pattern,
colours random): autoregressive clustering (AC, all 8
orderings) against its single-ordering ablation and a k-means on pixel colours, every one
scored by Hungarian matching of its clusters to the classes on the test split.

  python bench/experiments/arseg_shapes.py --data_dir DIR [--seeds 0 1 2] \\
      [--out docs/results/arseg_shapes.md]

AC runs are ``python -m bigvl.main --config configs/arseg_shapes.py:tiny[,single]`` (reused
when the same command already finished with the same code). The k-means baseline: Lloyd's
algorithm (k = 5, k-means++ seeding from the seed, 50 iterations; ``kmeans_centres``) on the
RGB values of 200,000 train pixels, then every test pixel to its nearest centre; scored with
the segmentation evaluator's own functions (``bigvl.evaluators.segmentation``), so all rows
share one protocol.
"""

from __future__ import annotations

import numpy as np
from _runs import arm_sweep_args, code_version, extra_flags, run_config  # bench/experiments/
from _table import class_cells, mean_std, paired, write_lines  # bench/experiments/

from bigvl.data import sources
from bigvl.evaluators import segmentation as seg

ARMS = [("AC, 8 orderings (unmasked inference)", "tiny", "test"),
        ("AC, 8 orderings (masked ensemble)", "tiny", "test_ensemble"),
        ("single ordering (no cross-ordering MI)", "tiny,single", "test")]
CLASSES = ("background", "circle", "square", "triangle", "star")
DATASET = "shapes_segmentation/textures"
K = len(CLASSES)


def _pixels(source, n_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``(rgb [N, H, W, 3] float, mask [N, H, W] int)`` of the first ``n_images`` records."""
  n = len(source) if n_images is None else min(n_images, len(source))
  ex = [source[i] for i in range(n)]
  return (np.stack([e["image"] for e in ex]).astype(np.float64),
          np.stack([np.asarray(e["mask"])[..., 0] for e in ex]).astype(np.int64))


def kmeans_scores(data_dir: str, seed: int) -> dict[str, float]:
  train, _ = sources.get_source(DATASET, "train", data_dir)
  test, _ = sources.get_source(DATASET, "test", data_dir)
  rgb, _ = _pixels(train)
  flat = rgb.reshape(-1, 3)
  sample = flat[np.random.default_rng(seed).choice(len(flat), 200_000, replace=False)]
  centres = seg.kmeans_centres(sample, K, seed)
  test_rgb, truth = _pixels(test)
  pred = seg.nearest_centre(test_rgb.reshape(-1, 3), centres)
  conf = seg.confusion_matrix(pred, truth.reshape(-1), K, K, 255)
  mapping = seg.hungarian_assignment(conf)
  return {f"test/{k}": v for k, v in
          seg.scores(seg.remap_confusion(conf, mapping), CLASSES).items()}


def main() -> None:
  ap = arm_sweep_args("arseg_shapes", arms=False)
  a = ap.parse_args()
  code = code_version()
  rows: dict[str, list[dict]] = {}
  for label, arg, ev in ARMS:
    runs = [run_config(a.root, arg.replace(",", "_"), f"arseg_shapes.py:{arg}", s, code,
                       [f"--config.input.data_dir={a.data_dir}", *a.extra]) for s in a.seeds]
    rows[label] = [{k.replace(f"{ev}/", "test/"): v for k, v in r.items()
                    if k.startswith(f"{ev}/")} for r in runs]
  base = "k-means on pixel colours"
  rows[base] = [kmeans_scores(a.data_dir, s) for s in a.seeds]
  order = [base] + [label for label, _, _ in ARMS]
  get = {label: {k: np.array([r[f"test/{k}"] for r in rows[label]])
                 for k in ("miou", "pixel_accuracy")} for label in order}
  extra = extra_flags(a.extra)
  test, _ = sources.get_source(DATASET, "test", a.data_dir)
  bg = float(np.mean(_pixels(test)[1] == 0))
  lines = [f"# Autoregressive unsupervised segmentation on {DATASET} "
           f"({len(a.seeds)} seeds, {code})", "",
           f"Command: `python bench/experiments/arseg_shapes.py --data_dir DIR --seeds "
           f"{' '.join(map(str, a.seeds))}{extra}`", "",
           "No label is read in training (`configs/arseg_shapes.py:tiny`: a 5-layer masked-conv "
           "network, width 32, 1,500 steps of 16 images, 5 clusters, IIC's MI over a 3x3 "
           "displacement window between the outputs of two orderings drawn per step, each "
           "view with its own photometric jitter and inversion with probability 0.5). Test "
           "split: 500 images; clusters matched 1-to-1 to the 5 classes by the Hungarian "
           "algorithm on the test split itself (the IIC / AC protocol); mIoU and pixel "
           f"accuracy in %, mean ± std over seeds. Every region of an image has its class's "
           f"fill pattern in random colours (colour carries no class information); an "
           f"all-background prediction scores {100 * bg:.1f}% pixel accuracy and "
           f"{100 * bg / K:.1f}% mIoU.", "",
           "| method | mIoU | pixel acc. | mIoU - k-means | mIoU - single ordering | " +
           " | ".join(f"IoU {c}" for c in CLASSES) + " |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(CLASSES)]
  single = ARMS[2][0]
  for label in order:
    vs_k = "" if label == base else paired(get[label]["miou"], get[base]["miou"])
    vs_s = "" if label in (base, single) else paired(get[label]["miou"], get[single]["miou"])
    lines.append(f"| {label} | {mean_std(get[label]['miou'])} | "
                 f"{mean_std(get[label]['pixel_accuracy'])} | {vs_k} | {vs_s} | " +
                 class_cells(rows[label], CLASSES) + " |")
  lines += ["", "Paired differences: mean ± std over seeds of (row - reference), in brackets "
            "the seeds where the row is ahead (k-means is seeded by the same seed)."]
  write_lines(lines, a.out)


if __name__ == "__main__":
  main()
