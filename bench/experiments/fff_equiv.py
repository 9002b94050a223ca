"""FFF's false-negative mining where the paper's effect lives: ``shapes_captions/equiv``.

  python bench/experiments/fff_equiv.py --data_dir DIR [--seeds 0 1 2 3] [--arms ...]

``equiv``'s false negatives are what the paper describes in web data: *different* images whose
captions say the same thing (re-renderings of one scene graph, other positions, sizes and
textures, shuffled paraphrases). The script

1. trains the teacher: a SigLIP run on the same data (``fff_shapes.py:tiny,data=equiv,
   baseline``, ``--teacher_steps``, seed ``--teacher_seed``, not one of the students' seeds);
2. calibrates its thresholds (``fff_teacher_pr.py``): the lowest text-text and image-image
   cosines whose precision against the ground-truth equivalences is >= ``--min_precision``;
3. trains every arm x seed (``python -m bigvl.main --config configs/fff_shapes.py:<arg>``,
   same steps, model, optimizer and data order within a seed): the SigLIP baseline, mining
   alone (teacher, and the oracle that mines exactly the true pairs; each with the paper's
   weights and with each image's positives normalised to weigh 1 in all), K = 5 captions alone
   and FFF (K = 5 + teacher mining);
4. writes the table: zero-shot accuracy and concept-level retrieval on the test split (200
   concepts x 5 renderings x 5 captions; scene R@1 and mAP count every rendering of the
   query's concept as correct), the mined pairs' precision / recall during training, and
   each arm paired with the baseline and mining paired with its no-mining twin.

Runs live in ``--root`` (one directory per run, reused only for the same command and code
version, ``_runs.py``); the table names the code version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from _runs import REPO, arm_sweep_args, code_version, extra_flags, run_config
from _table import mean_std, paired, write_lines
from fff_shapes import run_one, slug

CONFIG = "fff_shapes.py"
BASE = "tiny,data=equiv"
ORACLE = ["--config.loss.mining.source=groups"]
NO_MINING = ["--config.loss.mining.source=none"]
TEACHER = "teacher"  # placeholder in an arm's flags: the teacher checkpoint and thresholds
#: (name, config arg, flags); the first is the baseline every arm is paired with.
ARMS = [("SigLIP baseline (K=1)", f"{BASE},baseline", []),
        ("mining: teacher (K=1)", f"{BASE},k=1", [TEACHER]),
        ("mining: teacher, normalised (K=1)", f"{BASE},k=1",
         [TEACHER, "--config.loss.mining.normalize=True"]),
        ("mining: oracle (K=1)", f"{BASE},k=1", ORACLE),
        ("mining: oracle, normalised (K=1)", f"{BASE},k=1",
         [*ORACLE, "--config.loss.mining.normalize=True"]),
        ("K=5 captions, no mining", BASE, NO_MINING),
        ("FFF: K=5 + teacher mining", BASE, [TEACHER])]
#: mining's own contribution: (arm, its twin without mining).
MINING_PAIRS = [("mining: teacher (K=1)", "SigLIP baseline (K=1)"),
                ("mining: teacher, normalised (K=1)", "SigLIP baseline (K=1)"),
                ("mining: oracle (K=1)", "SigLIP baseline (K=1)"),
                ("mining: oracle, normalised (K=1)", "SigLIP baseline (K=1)"),
                ("FFF: K=5 + teacher mining", "K=5 captions, no mining")]
METRICS = [("zero-shot", "zeroshot/accuracy"),
           ("i2t scene R@1", "retrieval/i2t_scene_R@1"),
           ("t2i scene R@1", "retrieval/t2i_scene_R@1"),
           ("i2t scene mAP", "retrieval/i2t_scene_mAP"),
           ("t2i scene mAP", "retrieval/t2i_scene_mAP"),
           ("i2t R@1", "retrieval/i2t_R@1"), ("t2i R@1", "retrieval/t2i_R@1")]
PAIRED = ["zeroshot/accuracy", "retrieval/i2t_scene_mAP", "retrieval/t2i_scene_mAP",
          "retrieval/i2t_scene_R@1", "retrieval/t2i_scene_R@1"]


def train_log_means(workdir: str, keys: tuple[str, ...]) -> dict[str, float]:
  """The mean over logged training steps of each key (steps where it is logged)."""
  vals: dict[str, list] = {k: [] for k in keys}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      for k in keys:
        if k in rec:
          vals[k].append(rec[k])
  return {k: float(np.mean(v)) for k, v in vals.items() if v}


def calibrate(teacher: str, out_json: str, min_precision: float) -> dict:
  """``fff_teacher_pr.py`` on the teacher: its table (printed) and the chosen thresholds."""
  script = os.path.join(REPO, "bench", "experiments", "fff_teacher_pr.py")
  if not os.path.exists(out_json):
    subprocess.run([sys.executable, script, teacher, "--json", out_json,
                    "--min_precision", str(min_precision)], cwd=REPO, check=True)
  with open(out_json) as f:
    return json.load(f)


def main() -> None:
  ap = arm_sweep_args("fff_equiv")
  ap.set_defaults(seeds=[0, 1, 2, 3])
  ap.add_argument("--teacher_steps", type=int, default=1600)
  ap.add_argument("--teacher_seed", type=int, default=100)
  ap.add_argument("--min_precision", type=float, default=0.9)
  a = ap.parse_args()
  code = code_version()
  data = [f"--config.input.data_dir={a.data_dir}", *a.extra]
  run_config(a.root, "teacher", f"{CONFIG}:{BASE},baseline", a.teacher_seed, code,
             [f"--config.total_steps={a.teacher_steps}", *data])
  teacher = os.path.join(a.root, f"teacher_seed{a.teacher_seed}")
  cal = calibrate(teacher, os.path.join(teacher, f"pr_{code}.json"), a.min_precision)
  chosen = cal["chosen"]
  thr = {k: (chosen[k]["thr"] if chosen[k] else 2.0) for k in ("ii", "tt")}  # > 1: test off
  teacher_flags = [f"--config.loss.mining.teacher_ckpt={teacher}",
                   f"--config.loss.mining.thr_ii={thr['ii']}",
                   f"--config.loss.mining.thr_tt={thr['tt']}"]

  arms = [x for x in ARMS if a.arms is None or x[0] in a.arms or x[1] in a.arms]
  results: dict[str, dict[int, dict]] = {name: {} for name, _, _ in arms}
  # K = 1 arms for every seed first (mining's own contribution at K = 1 is complete early),
  # then the K = 5 arms; the table is rewritten after every run.
  for k1_phase in (True, False):
    for seed in a.seeds:
      for name, arg, flags in arms:
        if ("k=1" in arg or "baseline" in arg) != k1_phase:
          continue
        flags = [f for x in flags for f in (teacher_flags if x == TEACHER else [x])] + data
        wd = os.path.join(a.root, f"{slug(name, [])}_seed{seed}")  # the command is in run_key
        res = run_one(arg, flags, seed, wd, code)
        res.update(train_log_means(wd, ("mined_precision", "mined_recall",
                                        "true_extra_per_image")))
        results[name][seed] = res
        print(f"ARM {name} seed {seed}: " + ", ".join(
            f"{m} {100 * res[k]:.1f}" for m, k in METRICS[:5]), flush=True)
        write_lines(render(a, arms, results, cal, thr, code), a.out)


def render(a, arms, results, cal, thr, code) -> list[str]:
  """The markdown table of the finished runs (an arm's cells over the seeds it has; paired
  cells over the seeds both arms have)."""
  chosen = cal["chosen"]
  seeds = " ".join(map(str, a.seeds))
  command = (f"python bench/experiments/fff_equiv.py --data_dir DIR --seeds {seeds}"
             + (" --arms " + " ".join(f"'{x}'" for x in a.arms) if a.arms else "")
             + extra_flags(a.extra))
  lines = ["# FFF's mining on equivalent pairs (shapes_captions/equiv, tiny)", "",
           f"Command: `{command}` (code version `{code}`; DIR: the TFDS data dir)", "",
           "## The teacher and its thresholds", "",
           f"Teacher: `{CONFIG}:{BASE},baseline`, seed {a.teacher_seed}, {a.teacher_steps} "
           f"steps. Pairs of different images among the first {cal['num']} train images; "
           f"precision / recall (%) of `cosine >= thr` against the ground truth (same "
           "concept); `ii mined / image`: expected mined images per image in a batch of 128.",
           "", "| thr | ii precision | ii recall | ii mined / image | tt precision | "
           "tt recall |", "|---:|---:|---:|---:|---:|---:|"]
  per_image = 127 / (cal["num"] - 1)
  for r_ii, r_tt in zip(cal["ii"], cal["tt"], strict=True):
    lines.append(f"| {r_ii['thr']:g} | {100 * r_ii['precision']:.1f} | "
                 f"{100 * r_ii['recall']:.1f} | {r_ii['predicted'] / cal['num'] * per_image:.2f}"
                 f" | {100 * r_tt['precision']:.1f} | {100 * r_tt['recall']:.1f} |")
  lines += ["", f"Chosen (the lowest threshold with precision >= {100 * a.min_precision:g}%): "
            + ", ".join(f"thr_{k} = {thr[k]:g}" if chosen[k] else f"thr_{k}: none (off)"
                        for k in ("ii", "tt")) + ".", "",
            "## Students", "",
            "Mean ± std over the seeds in `seeds` (all in %). Test split: 200 concepts x 5 "
            "renderings x 5 captions; `scene`: every rendering of the query's concept (and "
            "each of its captions) is correct. `precision` / `recall`: of the mined pairs "
            "against the truth, mean over training; `true / image`: same-concept pairs per "
            "image in a batch besides its own captions.", "",
            "| arm | arg | seeds | " + " | ".join(m for m, _ in METRICS)
            + " | mined / image | precision | recall | true / image |",
            "|---|---|---|" + "---:|" * (len(METRICS) + 4)]
  for name, arg, flags in arms:
    rs = [results[name][s] for s in sorted(results[name])]
    if not rs:
      continue
    cells = [mean_std([r[k] for r in rs]) for _, k in METRICS]
    diag = [mean_std([r.get("mined_per_image", 0.0) for r in rs], scale=1, digits=2)]
    for k in ("mined_precision", "mined_recall"):
      diag.append(mean_std([r[k] for r in rs]) if k in rs[0] and name != ARMS[0][0] else "")
    diag.append(mean_std([r.get("true_extra_per_image", 0.0) for r in rs], scale=1, digits=2))
    shown = f"`{arg}`" + "".join(f" `{f}`" for f in flags if f != TEACHER) \
        + (" + teacher" if TEACHER in flags else "")
    lines.append(f"| {name} | {shown} | {','.join(map(str, sorted(results[name])))} | "
                 + " | ".join(cells + diag) + " |")
  names = dict((k, m) for m, k in METRICS)
  heads = " | ".join(names[k] for k in PAIRED)

  def pair_rows(pairs):
    out = []
    for arm, twin in pairs:
      common = sorted(set(results.get(arm, {})) & set(results.get(twin, {})))
      if common:
        out.append(f"| {arm} - {twin} | {len(common)} | " + " | ".join(
            paired([results[arm][s][k] for s in common], [results[twin][s][k] for s in common])
            for k in PAIRED) + " |")
    return out

  base = ARMS[0][0]
  lines += ["", "Paired with the baseline of the same seed (points; seeds ahead / seeds). At "
            "K = 1 this is mining's own contribution:", "",
            f"| arm - baseline | seeds | {heads} |", "|---|---:|" + "---:|" * len(PAIRED),
            *pair_rows([(name, base) for name, _, _ in arms[1:]])]
  twins = pair_rows([(a, t) for a, t in MINING_PAIRS if t != base])  # K = 5 pairs
  if twins:
    lines += ["", "Mining's own contribution at K = 5: each mining arm paired with its twin "
              "without mining (same seed):", "", f"| arm - twin | seeds | {heads} |",
              "|---|---:|" + "---:|" * len(PAIRED), *twins]
  first = next(iter(results.get(base, {}).values()), None)
  if first:
    lines += ["", f"Chance: zero-shot {100 * first['zeroshot/chance']:.1f}%, R@1 "
              f"{100 * first['retrieval/chance_R@1']:.2f}%."]
  return lines


if __name__ == "__main__":
  main()
