"""CLIP-DPO step 2: rank the LVLM's candidates with a two-tower (CLIP / SigLIP) model and filter
them with rules into DPO preference pairs.

Paper: Ouali et al., ECCV 2024 (``bigvl.tools.clip_dpo_candidates``). Every candidate answer
``a`` of an image ``x`` gets the score

    s(x, a) = 100 * cos(f_img(x), f_txt(a))          (the 100x cosine scale of CLIPScore)

A description is longer than a CLIP text tower reads well, so it is split into sentences
(``bigvl.data.preferences.split_sentences``), each sentence is scored and the scores are
aggregated (``rank.sentence_agg``: ``'mean'``, or ``'min'``: a single hallucinated sentence
sinks the answer). A yes/no question and its answer become one declarative sentence: the
question's object in ``rank.qa_template`` ("there is a {object}"); CLIP cannot score a
negation, so ``yes`` gets the affirmative sentence's score ``s`` and ``no`` its reflection
``2 tau - s`` about ``tau`` (``rank.qa_threshold``; default the median of the pool's
affirmative scores): the pair's gap is ``2 |s - tau|`` and ``rules.min_gap`` keeps only the
questions CLIP is sure of. Images whose score with ``rank.text_probes`` (e.g. "a photo of
text") exceeds ``rules.max_text_score`` are dropped: rendered text inflates CLIP scores.

Candidates are grouped by (image, question) and paired by ``bigvl.data.preferences.make_pairs``
with ``rank.rules`` (``min_gap`` 2 as the paper, absolute thresholds, both-bad, length ratio,
the pool's own answer as a candidate, ``pairing='random'``: the no-ranking ablation).

Outputs in the workdir: ``preferences.jsonl`` (one pair per line: texts, scores, sources,
``image_index``, ``question``, ``kind``, the reference log-probabilities ``chosen_ref_logp`` /
``rejected_ref_logp`` and, where the dataset has a scene graph, the true number of hallucinated
objects / the true answer of each side), ``filter_summary.json`` and ``filter_summary.md``: how
many candidates, groups and pairs each rule removed, and how often the kept pairs' chosen side
is truly the better one (scene graph): the ranking's precision.

Config: the two-tower's own training config (``task='two_tower'``: its dataset gives its
tokenizer) with ``init_from`` naming the trained ranker, ``tool='clip_dpo_rank'`` and
``rank.{candidates (a candidates workdir), dataset (where the candidates' images are; default
the config's), split ('train'), batch_size (256), sentence_agg ('mean'), qa_template,
qa_threshold, text_probes (()), seed (0), rules.{min_gap, min_chosen, max_rejected, both_bad,
max_length_ratio, max_text_score, include_gt, pairing, pairs_per_group}}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import pipeline, preferences, sources, streams
from bigvl.evaluators._embedding import embed_tokens
from bigvl.evaluators.captioning import named_objects, scene_objects
from bigvl.tools import _common
from bigvl.tools.clip_dpo_candidates import read_candidates

#: "is there a <object> in the image ?" -> the object.
QUESTION_RE = re.compile(r"^is there an? (.+?) in the image\s*\?$")
RULE_KEYS = tuple(f.name for f in dataclasses.fields(preferences.Rules))


def question_object(question: str) -> str:
  """The object a yes/no existence question asks about; ValueError for other questions."""
  m = QUESTION_RE.match(" ".join(question.lower().split()))
  if not m:
    raise ValueError(f"not a yes/no existence question: {question!r}")
  return m.group(1)


def qa_scores(affirmative: float, tau: float) -> dict[str, float]:
  """The scores of the answers ``yes`` / ``no``: ``s`` and its reflection ``2 tau - s``."""
  return {"yes": affirmative, "no": 2.0 * tau - affirmative}


class Tool:
  """See the module docstring."""

  def __init__(self, config: Reader, task: Any, mesh: Mesh):
    self._img, self._txt = _common.embedding_fns(task, "clip_dpo_rank")
    r = config.get("rank") or Reader({}, "config.rank")
    self.task, self.mesh = task, mesh
    path = r.typed("candidates", str, None)
    if not path:
      raise ConfigError("config.rank.candidates is not set: the workdir of the "
                        "clip_dpo_candidates tool")
    self.candidates_path = os.path.expanduser(path)
    self.dataset = r.typed("dataset", str, task.dataset)
    self.split = r.typed("split", str, "train")
    self.batch_size = positive_int(r, "batch_size", 256)
    parallel.batch_size_per_host(self.batch_size, mesh, f"{r.path}.batch_size")
    self.sentence_agg = check_choice(f"{r.path}.sentence_agg",
                                     r.typed("sentence_agg", str, "mean"),
                                     preferences.AGGREGATIONS)
    self.qa_template = r.typed("qa_template", str, "there is a {object}")
    qt = r.get("qa_threshold")
    self.qa_threshold = None if qt is None else float(qt)
    self.text_probes = tuple(r.get("text_probes") or ())
    self.seed = r.typed("seed", int, 0)
    rules = r.get("rules") or Reader({}, f"{r.path}.rules")
    unknown = set(rules.keys()) - set(RULE_KEYS)
    if unknown:
      raise ConfigError(f"{rules.path} has unknown keys {sorted(unknown)}; known: {RULE_KEYS}")
    self.rules = preferences.Rules(**{k: rules.get(k) for k in rules.keys()})
    if self.rules.max_text_score is not None and not self.text_probes:
      raise ConfigError(f"{rules.path}.max_text_score needs rank.text_probes (texts that "
                        f"describe rendered text, e.g. 'a photo of text')")
    self.source, _ = sources.get_source(self.dataset, self.split, task.data_dir)
    self._image_rows = task.eval_transform("image_text")

  # --- embedding ---------------------------------------------------------------------------
  def embed_images(self, params: Any, indices: Sequence[int]) -> np.ndarray:
    """``[len(indices), E]`` image embeddings."""
    examples = streams.IndexedSubset(self.source, indices)
    out = []
    for local, n in _common.progress(
        pipeline.eval_batches(examples, self._image_rows, self.batch_size),
        -(-len(indices) // self.batch_size), "rank: images", unit="batch"):
      batch = parallel.global_batch({"image": local["image"]}, self.mesh)
      out.append(parallel.to_host(self._img(params, None, batch))[:n])
    return np.concatenate(out)

  def embed_texts(self, params: Any, texts: Sequence[str]) -> np.ndarray:
    """``[len(texts), E]`` text embeddings (padded to whole global batches)."""
    return embed_tokens(self._txt, params, None, self.task.encode_texts(list(texts))["tokens"],
                        self.batch_size, self.mesh, desc="rank: texts")

  # --- scoring -----------------------------------------------------------------------------
  def score(self, params: Any, rows: list[dict]) -> tuple[list[dict], dict[int, float]]:
    """Adds ``score`` (and ``sentence_scores``) to every candidate row; returns the rows and
    the text-probe score of every image (empty without probes)."""
    images = sorted({r["image_index"] for r in rows})
    at = {i: k for k, i in enumerate(images)}
    zimg = self.embed_images(params, images)
    pieces: list[str] = []
    for r in rows:
      r["_sentences"] = ([self.qa_template.format(object=question_object(r["question"]))]
                         if r["kind"] == "qa" else
                         preferences.split_sentences(r["text"]) or [r["text"]])
      pieces += r["_sentences"]
    unique = sorted(set(pieces) | set(self.text_probes))
    ztxt = self.embed_texts(params, unique)
    pos = {t: k for k, t in enumerate(unique)}
    for r in rows:
      sims = [100.0 * float(zimg[at[r["image_index"]]] @ ztxt[pos[t]]) for t in r["_sentences"]]
      r["sentence_scores"] = sims
      r["score"] = preferences.aggregate_sentences(sims, self.sentence_agg)
      del r["_sentences"]
    qa = [r for r in rows if r["kind"] == "qa"]
    if qa:
      tau = (self.qa_threshold if self.qa_threshold is not None
             else float(np.median([r["score"] for r in qa])))
      for r in qa:
        r["score"] = qa_scores(r["score"], tau)[r["text"]]
        r["qa_threshold"] = tau
    text_scores = {}
    if self.text_probes:
      probes = np.stack([ztxt[pos[t]] for t in self.text_probes])
      for i in images:
        text_scores[i] = float(100.0 * np.max(probes @ zimg[at[i]]))
    return rows, text_scores

  def truth(self, image_index: int, row: dict) -> dict[str, Any]:
    """The scene graph's verdict on a candidate: hallucinated objects (descriptions) or
    whether the answer is right (yes/no questions); {} without a scene graph."""
    ex = self.source[image_index]
    if ex is None or "objects" not in ex:
      return {}
    scene = scene_objects(ex["objects"])
    if row["kind"] == "qa":
      color, _, shape = question_object(row["question"]).partition(" ")
      truth = "yes" if (color, shape) in scene else "no"
      return {"wrong": int(row["text"] != truth)}
    named = named_objects(row["text"])
    return {"wrong": len(named - scene), "missed": len(scene - named)}

  # --- the tool ----------------------------------------------------------------------------
  def run(self, run: Any, workdir: str) -> None:
    rows, bad = read_candidates(self.candidates_path)
    if jax.process_index() == 0:
      print(f"bigvl: ranking {len(rows)} candidates ({bad} unreadable lines skipped) from "
            f"{self.candidates_path} with {type(self.task).__module__}; rules {self.rules}",
            flush=True)
    params = _common.load_params(run)
    rows, text_scores = self.score(params, rows)
    groups: dict[tuple, list[preferences.Candidate]] = defaultdict(list)
    for r in rows:
      groups[(r["image_index"], r["question"])].append(preferences.Candidate(
          text=r["text"], score=r["score"], source="gt" if r["source"] == "gt" else "sample",
          sentence_scores=tuple(r["sentence_scores"]), meta=r))
    pairs, summary = preferences.make_pairs(groups, self.rules,
                                            text_scores=text_scores or None, seed=self.seed)
    verdicts = {"better": 0, "tie": 0, "worse": 0}
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: dict(verdicts))

    def extra(pair: preferences.Pair) -> dict:
      c, rj = pair.chosen.meta, pair.rejected.meta
      out = {"image_index": c["image_index"], "question": c["question"], "kind": c["kind"],
             "chosen_ref_logp": c.get("ref_logp"), "rejected_ref_logp": rj.get("ref_logp")}
      tc, tr = self.truth(c["image_index"], c), self.truth(rj["image_index"], rj)
      if tc:
        out.update(chosen_wrong=tc["wrong"], rejected_wrong=tr["wrong"])
        v = ("better" if tc["wrong"] < tr["wrong"] else
             "tie" if tc["wrong"] == tr["wrong"] else "worse")
        by_kind["qa" if c["kind"] == "qa" else c["question"]][v] += 1
      return out

    if jax.process_index() != 0:
      return
    n = preferences.write_pairs_jsonl(os.path.join(workdir, "preferences.jsonl"), pairs, extra)
    report = {"rules": {k: getattr(self.rules, k) for k in RULE_KEYS}, "summary": summary,
              "candidates": len(rows), "unreadable_lines": bad,
              "pair_truth": {k: dict(v) for k, v in by_kind.items()},
              "sentence_agg": self.sentence_agg,
              "qa_threshold": next((r["qa_threshold"] for r in rows if "qa_threshold" in r),
                                   None)}
    for name in ("filter_summary.json", "results.json"):  # results.json: the tool finished
      with open(os.path.join(workdir, name), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(workdir, "filter_summary.md"), "w") as f:
      f.write(preferences.summary_table(summary) + "\n\n" + truth_table(report["pair_truth"]))
    print(f"bigvl: {n} preference pairs -> {os.path.join(workdir, 'preferences.jsonl')}; "
          f"removed: " + ", ".join(f"{k} {v}" for k, v in summary.items()
                                   if k not in ("groups", "pairs") and v) +
          f"; chosen truly better: {dict(report['pair_truth'])}", flush=True)


def truth_table(pair_truth: dict[str, dict[str, int]]) -> str:
  """Markdown: per prompt (``qa``: the yes/no questions), how many kept pairs have a truly
  better / equal / worse chosen side (fewer hallucinated objects; the right answer)."""
  lines = ["| prompt | chosen better | tie | chosen worse |", "|---|---:|---:|---:|"]
  for kind, v in sorted(pair_truth.items()):
    lines.append(f"| {kind} | {v['better']} | {v['tie']} | {v['worse']} |")
  return "\n".join(lines) + "\n"
