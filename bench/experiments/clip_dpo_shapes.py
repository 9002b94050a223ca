"""CLIP-DPO on synthetic scenes: hallucination of an SFT LVLM before and after DPO on
CLIP-ranked pairs of its own answers, against DPO on randomly paired candidates.

  python bench/experiments/clip_dpo_shapes.py --data_dir DIR [--seeds 0 1 2] \\
      [--out docs/results/clip_dpo_shapes.md]

Every stage is a ``python -m bigvl.main`` command of ``configs/clip_dpo_shapes.py:tiny``,
reused when the same command already finished with the same code (``_runs.prepare_workdir``):
the ranker (a SigLIP model pre-trained once on independent scenes, seed 0: CLIP is a fixed
pre-trained model in the paper), then per seed the SFT LVLM (on the hallucinating pool of
``shapes_captions/cooc``), its candidates, the CLIP ranking and the random pairing (same
candidates, same rules but no ranking), and DPO on each (same steps, same settings). The "SFT"
row is the DPO runs' step-0 evaluation (``eval_at_start``) of the same model. The table gives
mean ± std over seeds, the paired difference to the SFT model of the same seed and CLIP-DPO's
paired difference to random pairs; then the filter's per-rule counts and how often the kept
pairs' chosen answer is truly better (scene graph).

``--sweep`` instead runs the DPO settings compared on seed 0 before the default was fixed
(learning rate, beta, the chosen answers' NLL term), each on the CLIP-ranked and on the random
pairs, and writes ``docs/results/clip_dpo_sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from _runs import REPO, code_version, prepare_workdir  # bench/experiments/_runs.py
from _table import write_lines  # bench/experiments/_table.py

CONFIG = "configs/clip_dpo_shapes.py:tiny"
# (label, key, scale to %, lower is better)
METRICS = [("POPE F1", "hallucination/pope/f1", True, False),
           ("POPE adv. F1", "hallucination/pope_adversarial/f1", True, False),
           ("yes ratio (adv.)", "hallucination/pope_adversarial/yes_ratio", True, None),
           ("CHAIR", "hallucination/chair", True, True),
           ("Hal", "hallucination/hal", True, True),
           ("Cog", "hallucination/cog", True, True),
           ("Cover", "hallucination/cover", True, False),
           ("zero-shot", "hallucination/zeroshot/accuracy", True, False),
           ("words", "hallucination/mean_words", False, None)]


def run(root: str, name: str, arg: str, data_dir: str, code: str, extra: list[str] = ()
        ) -> tuple[str, dict, float]:
  workdir = os.path.join(root, name)
  cmd = ["-m", "bigvl.main", "--config", f"{CONFIG},{arg}", "--workdir", workdir,
         f"--config.input.data_dir={data_dir}", *extra]
  t0 = time.time()
  if not prepare_workdir(workdir, cmd, code):
    subprocess.run([sys.executable, *cmd], cwd=REPO, check=True)
  with open(os.path.join(workdir, "results.json")) as f:
    return workdir, json.load(f), time.time() - t0


def step0(workdir: str) -> dict:
  """The evaluation at step 0 (the SFT model) from a DPO run's metrics.jsonl."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if row.get("step") == 0:
        out.update({k: v for k, v in row.items() if k != "step"})
  return out


def cell(v: np.ndarray, scale: bool) -> str:
  v = 100 * v if scale else v
  return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def diff(a: np.ndarray, b: np.ndarray, scale: bool, lower: bool | None) -> str:
  d = (a - b) * (100 if scale else 1)
  better = "" if lower is None else f" ({int(np.sum(d < 0 if lower else d > 0))}/{len(d)})"
  return f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:.1f}{better}"


#: (label, DPO overrides) of --sweep; the second is the default of configs/clip_dpo_shapes.py.
SWEEP = [("plain DPO, lr 1e-3", ["--config.optim.lr=1e-3", "--config.dpo.sft_weight=0.0"]),
         ("DPO + NLL(chosen), lr 3e-4 (default)", []),
         ("plain DPO, lr 1e-4", ["--config.optim.lr=1e-4", "--config.dpo.sft_weight=0.0"]),
         ("plain DPO, lr 3e-4, beta 0.5", ["--config.optim.lr=3e-4", "--config.dpo.beta=0.5",
                                           "--config.dpo.sft_weight=0.0"])]


def sweep(a, code: str) -> None:
  ranker, _, _ = run(a.root, "ranker", "stage=ranker,seed=0", a.data_dir, code)
  sft, _, _ = run(a.root, "sft_seed0", "stage=sft,seed=0", a.data_dir, code)
  cand, _, _ = run(a.root, "candidates_seed0", f"stage=candidates,seed=0,sft={sft}",
                   a.data_dir, code)
  head = "| DPO setting | pairs | " + " | ".join(n for n, *_ in METRICS) + " |"
  lines = [f"# CLIP-DPO on shapes_captions/cooc: DPO settings (seed 0, {code})", "",
           "Command: `python bench/experiments/clip_dpo_shapes.py --data_dir DIR --sweep`", "",
           "The same SFT model, candidates and ranker as seed 0 of "
           "[clip_dpo_shapes.md](clip_dpo_shapes.md); each setting on the CLIP-ranked and on "
           "the random pairs (same steps). In %, 128 test images, one seed: differences of a "
           "few points are within noise.", "", head, "|---|---|" + "---:|" * len(METRICS)]
  sft_row = None
  for label, extra in SWEEP:
    for pairing in ("clip", "random"):
      rank, _, _ = run(a.root, f"rank_{pairing}_seed0",
                       f"stage=rank,seed=0,ranker={ranker},candidates={cand},pairing={pairing}",
                       a.data_dir, code)
      name = f"dpo_{pairing}_seed0" if not extra else \
          f"sweep_{pairing}_{'_'.join(x.split('.')[-1] for x in extra)}"
      dpo, res, _ = run(a.root, name, f"stage=dpo,seed=0,sft={sft},preferences={rank}",
                        a.data_dir, code, extra)
      sft_row = sft_row or step0(dpo)
      lines.append(f"| {label} | {pairing} | " + " | ".join(
          cell(np.array([res[k]]), sc) for _, k, sc, _ in METRICS) + " |")
  lines.insert(len(lines) - 2 * len(SWEEP), "| SFT (before DPO) | - | " + " | ".join(
      cell(np.array([sft_row[k]]), sc) for _, k, sc, _ in METRICS) + " |")
  # the default setting on the description and caption pairs only (the yes/no pairs removed)
  rank = os.path.join(a.root, "rank_clip_seed0")
  no_qa = os.path.join(a.root, "prefs_clip_seed0_no_qa")
  os.makedirs(no_qa, exist_ok=True)
  with open(os.path.join(rank, "preferences.jsonl")) as f, \
       open(os.path.join(no_qa, "preferences.jsonl"), "w") as g:
    g.writelines(line for line in f if json.loads(line)["kind"] != "qa")
  _, res, _ = run(a.root, "sweep_clip_no_qa", f"stage=dpo,seed=0,sft={sft},preferences={no_qa}",
                  a.data_dir, code)
  lines.append("| DPO + NLL(chosen), lr 3e-4, without the yes/no pairs | clip | " + " | ".join(
      cell(np.array([res[k]]), sc) for _, k, sc, _ in METRICS) + " |")
  # how often the ranker's kept pairs are right, by the pair's score gap (seed 0)
  with open(os.path.join(rank, "preferences.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  lines += ["", "Seed 0's CLIP-ranked pairs: the fraction whose chosen side is truly better "
            "(scene graph), by the minimum score gap (100x cosine):", "",
            "| gap >= | yes/no pairs | right | description pairs | chosen better | chosen worse |",
            "|---:|---:|---:|---:|---:|---:|"]
  for gap in (2, 4, 8, 14):
    qa = [p for p in pairs if p["kind"] == "qa" and p["chosen_score"] - p["rejected_score"] >= gap]
    de = [p for p in pairs if p["question"] == "description"
          and p["chosen_score"] - p["rejected_score"] >= gap]
    lines.append(
        f"| {gap} | {len(qa)} | {100 * np.mean([p['chosen_wrong'] == 0 for p in qa]):.0f}% | "
        f"{len(de)} | "
        f"{100 * np.mean([p['chosen_wrong'] < p['rejected_wrong'] for p in de]):.0f}% | "
        f"{100 * np.mean([p['chosen_wrong'] > p['rejected_wrong'] for p in de]):.0f}% |")
  out = os.path.join(os.path.dirname(a.out), "clip_dpo_sweep.md")
  write_lines(lines, out)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--root", default="/tmp/bigvl/clip_dpo_shapes")
  ap.add_argument("--out", default=os.path.join(REPO, "docs/results/clip_dpo_shapes.md"))
  ap.add_argument("--sweep", action="store_true", help="the DPO settings on seed 0")
  a = ap.parse_args()
  code = code_version()
  if a.sweep:
    sweep(a, code)
    return
  ranker, _, ranker_secs = run(a.root, "ranker", "stage=ranker,seed=0", a.data_dir, code)
  rows: dict[str, list[dict]] = {"SFT (before DPO)": [], "DPO, random pairs": [],
                                 "CLIP-DPO": []}
  filters: dict[str, list[dict]] = {"clip": [], "random": []}
  secs: dict[str, list[float]] = {}
  for seed in a.seeds:
    sft, _, t = run(a.root, f"sft_seed{seed}", f"stage=sft,seed={seed}", a.data_dir, code)
    secs.setdefault("sft", []).append(t)
    cand, _, t = run(a.root, f"candidates_seed{seed}",
                     f"stage=candidates,seed={seed},sft={sft}", a.data_dir, code)
    secs.setdefault("candidates", []).append(t)
    for pairing, label in (("random", "DPO, random pairs"), ("clip", "CLIP-DPO")):
      rank, report, t = run(a.root, f"rank_{pairing}_seed{seed}",
                            f"stage=rank,seed={seed},ranker={ranker},candidates={cand},"
                            f"pairing={pairing}", a.data_dir, code)
      secs.setdefault("rank", []).append(t)
      filters[pairing].append(report)
      dpo, res, t = run(a.root, f"dpo_{pairing}_seed{seed}",
                        f"stage=dpo,seed={seed},sft={sft},preferences={rank}", a.data_dir, code)
      secs.setdefault("dpo", []).append(t)
      rows[label].append(res)
      if pairing == "clip":
        rows["SFT (before DPO)"].append(step0(dpo))

  head = "| model | " + " | ".join(n for n, *_ in METRICS) + " |"
  rule = "|---|" + "---:|" * len(METRICS)
  lines = [f"# CLIP-DPO on shapes_captions/cooc ({len(a.seeds)} seeds, {code})", "",
           f"Command: `python bench/experiments/clip_dpo_shapes.py --data_dir DIR --seeds "
           f"{' '.join(map(str, a.seeds))}`", "",
           "Mean ± std over seeds, in % (words: mean generated description length). POPE: yes/no "
           "object questions (F1 averaged over random / popular / adversarial negatives); "
           "CHAIR = hallucinated / mentioned objects, Hal = descriptions with a hallucination, "
           "Cog = hallucinated co-occurring objects / mentioned, Cover = true objects "
           "mentioned, zero-shot = the largest object's class by answer likelihood "
           "(24 classes). 128 test images.", "", head, rule]
  for label, results in rows.items():
    lines.append(f"| {label} | " + " | ".join(
        cell(np.array([r[k] for r in results]), s) for _, k, s, _ in METRICS) + " |")
  base = rows["SFT (before DPO)"]
  lines += ["", "Paired differences of the same seed (points; in brackets the seeds where it "
            "is better):", "", head, rule]
  for label, ref in (("CLIP-DPO - SFT", base), ("random pairs - SFT", base),
                     ("CLIP-DPO - random pairs", rows["DPO, random pairs"])):
    mine = rows["CLIP-DPO" if label.startswith("CLIP") else "DPO, random pairs"]
    lines.append(f"| {label} | " + " | ".join(
        diff(np.array([r[k] for r in mine]), np.array([r[k] for r in ref]), s, lower)
        for _, k, s, lower in METRICS) + " |")
  lines += ["", "Filter (rank stage), per seed mean: candidates removed by each rule and pairs "
            "kept; and how often a kept pair's chosen answer is truly better than its rejected "
            "one by the scene graph (fewer hallucinated objects; the right yes/no answer):", "",
            "| pairing | " + " | ".join(filters["clip"][0]["summary"]) + " |",
            "|---|" + "---:|" * len(filters["clip"][0]["summary"])]
  for pairing, reports in filters.items():
    lines.append(f"| {pairing} | " + " | ".join(
        f"{np.mean([r['summary'][k] for r in reports]):.0f}" for k in reports[0]["summary"])
        + " |")
  lines += ["", "| pairing | prompt | chosen better | tie | chosen worse |",
            "|---|---|---:|---:|---:|"]
  for pairing, reports in filters.items():
    for prompt in sorted(reports[0]["pair_truth"]):
      v = {k: np.mean([r["pair_truth"].get(prompt, {}).get(k, 0) for r in reports])
           for k in ("better", "tie", "worse")}
      total = sum(v.values()) or 1
      lines.append(f"| {pairing} | {prompt} | " + " | ".join(
          f"{100 * v[k] / total:.0f}%" for k in ("better", "tie", "worse")) + " |")
  lines += ["", "Wall time per run (2-core CPU): " + ", ".join(
      f"{k} {np.mean(v):.0f} s" for k, v in secs.items()) + f", ranker {ranker_secs:.0f} s "
      "(once)."]
  write_lines(lines, a.out)


if __name__ == "__main__":
  main()
