"""CLIP-DPO end to end through ``python -m bigvl.main``: candidates from the shared tiny
captioner (restartable without duplicates), CLIP ranking + rules, DPO against the frozen SFT
model (first loss log 2: LoRA starts as the identity) with the hallucination evaluation before
and after."""

from __future__ import annotations

import filecmp
import json
import math
import os

import pytest

from tests.helpers import run_main, tiny_flags

pytestmark = pytest.mark.slow
CONFIG = "configs/clip_dpo_shapes.py:tiny"


def _ok(res):
  assert res.returncode == 0, res.stderr[-3000:]
  return res


def _ranker_flags(data_dir):
  # the small two-tower of the other tests, trained for seconds: enough to rank
  flags = tiny_flags(data_dir, total_steps=40, log_every=20, ckpt_every=40)
  return [f for f in flags if "evals." not in f]


@pytest.fixture(scope="module")
def pipeline(shapes_data_dir, tiny_captioner, tmp_path_factory):
  root = tmp_path_factory.mktemp("clip_dpo")
  sft, _ = tiny_captioner
  w = {k: str(root / k) for k in ("ranker", "cand", "rank", "dpo")}
  _ok(run_main(["--config", f"{CONFIG},stage=ranker", "--workdir", w["ranker"],
                *_ranker_flags(shapes_data_dir), "--config.evals.zeroshot.every=40"]))
  cand_flags = [f"--config.input.data_dir={shapes_data_dir}",
                "--config.input.dataset=shapes_captions/cooc_small",
                "--config.candidates.num_images=48", "--config.candidates.chunk_images=16",
                "--config.candidates.batch_size=16", "--config.candidates.samples=1",
                "--config.candidates.temperatures=(1.0,)", "--config.candidates.top_p=(0.9,)"]
  cmd = ["--config", f"{CONFIG},stage=candidates,sft={sft}", "--workdir", w["cand"],
         *cand_flags]
  res = _ok(run_main(cmd))
  _ok(run_main(["--config", f"{CONFIG},stage=rank,ranker={w['ranker']},candidates={w['cand']}",
                "--workdir", w["rank"], *_ranker_flags(shapes_data_dir),
                "--config.rank.dataset=shapes_captions/cooc_small",
                "--config.rank.batch_size=64"]))
  dpo = _ok(run_main(["--config", f"{CONFIG},stage=dpo,sft={sft},preferences={w['rank']}",
                      "--workdir", w["dpo"], f"--config.input.data_dir={shapes_data_dir}",
                      "--config.input.dataset=shapes_captions/cooc_small",
                      "--config.input.batch_size=8", "--config.total_steps=6",
                      "--config.log_every=1", "--config.evals.hallucination.num_examples=16",
                      "--config.evals.hallucination.batch_size=16",
                      "--config.evals.hallucination.stats_examples=200"], timeout=900))
  return w, cmd, res, dpo


def test_candidates_restart_writes_the_same_and_no_duplicates(pipeline):
  w, cmd, res, _ = pipeline
  out = os.path.join(w["cand"], "candidates")
  assert "candidates" in res.stderr  # the progress bar
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  # 48 images x (2 prompts x 1 setting x 1 sample, minus empty texts) + 48 gt + 48 x yes/no
  assert summary["images"] == 48 and summary["duplicate_records"] == 0
  assert summary["by_kind"]["caption/gt"] == 48 and summary["by_kind"]["qa/qa"] == 96
  assert summary["by_kind"]["caption/sample"] <= 96
  keep = os.path.join(w["cand"], "chunk_00001.before")
  os.replace(os.path.join(out, "chunk_00001.jsonl"), keep)  # as if killed before chunk 1
  rerun = _ok(run_main(cmd))
  assert "(2 done)" in rerun.stdout
  assert filecmp.cmp(keep, os.path.join(out, "chunk_00001.jsonl"), shallow=False)
  with open(os.path.join(out, "summary.json")) as f:
    assert json.load(f) == summary


def test_rank_writes_pairs_and_counts_every_rule(pipeline):
  w, *_ = pipeline
  with open(os.path.join(w["rank"], "filter_summary.json")) as f:
    report = json.load(f)
  s = report["summary"]
  assert s["pairs"] > 0
  with open(os.path.join(w["rank"], "preferences.jsonl")) as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) == s["pairs"]
  for p in pairs:
    assert p["chosen_score"] - p["rejected_score"] >= report["rules"]["min_gap"] - 1e-9
    assert p["chosen"] != p["rejected"] and p["chosen_ref_logp"] is not None
  truth = sum(sum(v.values()) for v in report["pair_truth"].values())
  assert truth == s["pairs"]
  assert os.path.exists(os.path.join(w["rank"], "filter_summary.md"))


def test_dpo_starts_at_log2_and_evaluates_before_and_after(pipeline):
  w, *_ = pipeline
  rows = [json.loads(line) for line in open(os.path.join(w["dpo"], "metrics.jsonl"))]
  first = next(r for r in rows if r.get("step") == 1 and "loss" in r)
  assert first["dpo_loss"] == pytest.approx(math.log(2), abs=1e-5)  # loss adds the NLL term
  assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
  evals = [r for r in rows if "hallucination/chair" in r]
  assert [r["step"] for r in evals] == [0, 6]
  for key in ("hallucination/pope/f1", "hallucination/cover", "hallucination/hal",
              "hallucination/cog", "hallucination/zeroshot/accuracy"):
    assert 0.0 <= evals[0][key] <= 1.0
