"""CLIP-DPO step 1: sample candidate answers from the LVLM on its own SFT pool.

Paper: Ouali et al., "CLIP-DPO: Vision-Language Models as a Source of Preference for Fixing
Hallucinations in LVLMs", ECCV 2024. Starting from the images of the supervised fine-tuning
pool, the LVLM itself writes a diverse set of answers per image; a CLIP model later ranks them
(``bigvl.tools.clip_dpo_rank``) into (chosen, rejected) pairs for DPO (``bigvl.tasks.clip_dpo``).

Two kinds of candidate, as the paper:

* **descriptions** ``kind='caption'``: for every question of ``candidates.prompts`` (named
  questions of the chat templates, e.g. ``'caption'`` short and ``'description'`` detailed) and
  every sampling setting ``(temperatures[j], top_p[j])``, ``samples`` sampled answers
  (``bigvl.generate.generate_ids``, jit-compiled, batches sharded over the mesh's data axes);
  plus the pool's own answer (``source='gt'``) where ``candidates.gt`` names its field;
* **question answering** ``kind='qa'``: the pool's yes/no question (``candidates.qa_key``, e.g.
  "is there a blue square in the image ?", which the scene graph writes) with both answers
  ``'yes'`` and ``'no'``; the ranker turns a question and answer into one declarative
  sentence.

Every candidate is also scored by the generating model itself, ``ref_logp = log pi_ref(answer |
image, question)`` (teacher forced, the SFT model is DPO's reference), so DPO can use
precomputed reference log-probabilities (``dpo.reference='precomputed'``).

Output: ``<workdir>/candidates/chunk_<k>.jsonl`` (``candidates.chunk_images`` images each), one
JSON object per candidate: ``image_index, kind, question, text, source, temperature, top_p,
sample, ref_logp``. **Resumable**: a chunk file is written atomically when the chunk is whole
and a restarted run skips the chunks that exist; sampling keys are ``fold_in``s of
``(seed, chunk, prompt, setting, sample)``, so a restarted run writes what an uninterrupted one
writes, and no candidate twice. ``<workdir>/candidates/summary.json`` (and ``results.json``, the
mark of a finished run) counts them at the end.

Config: the LVLM's training config (``task='lvlm_caption'`` with its ``input``, ``model``,
``generate``) with ``init_from`` naming the SFT run, ``tool='clip_dpo_candidates'`` and
``candidates.{split ('train'), num_images (all), batch_size (64, global), chunk_images (256),
prompts (('caption', 'description')), temperatures ((0.7, 1.0)), top_p ((0.9, 1.0)), samples
(2), max_new_tokens (the task's), gt ({question: example key}), qa_key (None)}``.
"""

from __future__ import annotations

import functools
import glob
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import generate, parallel
from bigvl.config import ConfigError, Reader, positive_int
from bigvl.data import pipeline, sources, transforms
from bigvl.tools import _common

#: the two answers of a yes/no question candidate.
YES_NO = ("yes", "no")


class Range:
  """Records ``start .. stop - 1`` of a random-access source."""

  def __init__(self, source: Any, start: int, stop: int):
    self._source, self._start, self._n = source, start, max(0, stop - start)

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> Any:
    if not 0 <= i < self._n:
      raise IndexError(i)
    return self._source[self._start + i]


class Tool:
  """See the module docstring."""

  def __init__(self, config: Reader, task: Any, mesh: Mesh):
    if not hasattr(task, "chat") or not hasattr(task, "lvlm_params"):
      raise ConfigError(f"tool clip_dpo_candidates needs an LVLM task (lvlm_caption), got "
                        f"{type(task).__module__}")
    c = config.get("candidates") or Reader({}, "config.candidates")
    self.task, self.mesh, self.seed = task, mesh, config.typed("seed", int)
    self.split = c.typed("split", str, "train")
    self.source, _ = sources.get_source(task.dataset, self.split, task.data_dir)
    n = c.typed("num_images", int, None)
    self.num_images = len(self.source) if n is None else min(n, len(self.source))
    self.batch_size = positive_int(c, "batch_size", 64)
    parallel.batch_size_per_host(self.batch_size, mesh, f"{c.path}.batch_size")
    self.chunk = positive_int(c, "chunk_images", 256)
    self.prompts = tuple(c.get("prompts") or ("caption", "description"))
    temps = tuple(float(t) for t in (c.get("temperatures") or (0.7, 1.0)))
    top_p = tuple(float(p) for p in (c.get("top_p") or (0.9, 1.0)))
    if len(temps) != len(top_p) or any(t <= 0 for t in temps) or any(
        not 0 < p <= 1 for p in top_p):
      raise ConfigError(f"{c.path}: temperatures {temps} and top_p {top_p} must be as many, "
                        f"temperatures > 0 and top_p in (0, 1]")
    self.settings = tuple(zip(temps, top_p, strict=True))
    self.samples = positive_int(c, "samples", 2)
    self.max_new = positive_int(c, "max_new_tokens", task.max_new_tokens)
    gt = c.get("gt")
    self.gt = gt.to_dict() if gt is not None else {}
    self.qa_key = c.typed("qa_key", str, None)
    example = self.source[0]
    for key in list(self.gt.values()) + ([self.qa_key] if self.qa_key else []):
      if key not in example:
        raise ConfigError(f"{c.path}: dataset {task.dataset!r} has no field {key!r}; it has "
                          f"{', '.join(example)}")
    self._prompt_rows = {q: task.eval_transform("image_prompt", question=q)
                         for q in self.prompts}
    self._answer_rows = task.eval_transform("image_answer")
    self._score = jax.jit(task.predict_fns()["answer_logprobs"])

  @functools.cache  # noqa: B019 -- one compiled sampler per setting, for the tool's lifetime
  def _sampler(self, temperature: float, top_p: float):
    task = self.task

    def sample(params, batch, rng):
      return generate.generate_ids(
          task.model, {"params": task.lvlm_params(params)}, batch["prompt"],
          batch["prompt_mask"].astype(bool), self.max_new, temperature=temperature,
          top_p=None if top_p >= 1.0 else top_p, rng=rng, eos_id=task.tokenizer.eos_id,
          pad_id=task.tokenizer.pad_id, inputs={"images": batch["image"]})

    return jax.jit(sample)

  def _batches(self, source: Any, transform: Any):
    for local, n in pipeline.eval_batches(source, transform, self.batch_size):
      yield parallel.global_batch(local, self.mesh), n

  def sample_chunk(self, params: Any, k: int) -> list[dict]:
    """Every candidate of chunk ``k`` (images ``k * chunk_images ...``), without ``ref_logp``."""
    start = k * self.chunk
    part = Range(self.source, start, min(start + self.chunk, self.num_images))
    rows: list[dict] = []
    key = jax.random.key(self.seed)
    for qi, q in enumerate(self.prompts):
      transform = self._prompt_rows[q]
      for si, (temp, top_p) in enumerate(self.settings):
        fn = self._sampler(temp, top_p)
        for s in range(self.samples):
          offset = 0
          rng = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(
              jax.random.fold_in(key, k), qi), si), s)
          for b, (batch, n) in enumerate(self._batches(part, transform)):
            ids = parallel.to_host(fn(params, batch, jax.random.fold_in(rng, b)))[:n]
            for j, text in enumerate(self.task.decode_texts(np.asarray(ids))):
              if text.strip():
                rows.append({"image_index": start + offset + j, "kind": "caption",
                             "question": q, "text": text, "source": "sample",
                             "temperature": temp, "top_p": top_p, "sample": s})
            offset += n
    for j in range(len(part)):
      ex = part[j]
      if ex is None:
        continue
      for q, field in self.gt.items():
        rows.append({"image_index": start + j, "kind": "caption", "question": q,
                     "text": transforms.texts_of(ex[field])[0], "source": "gt",
                     "temperature": None, "top_p": None, "sample": None})
      if self.qa_key:
        question = transforms.texts_of(ex[self.qa_key])[0]
        rows += [{"image_index": start + j, "kind": "qa", "question": question, "text": a,
                  "source": "qa", "temperature": None, "top_p": None, "sample": None}
                 for a in YES_NO]
    return rows

  def score_rows(self, params: Any, rows: Sequence[dict]) -> None:
    """Adds ``ref_logp`` (the generating model's log-probability) to every row, in place."""
    examples = _Examples(self.source, rows)
    out: list[float] = []
    for batch, n in self._batches(examples, self._answer_rows):
      out += [float(x) for x in parallel.to_host(self._score(params, None, batch))[:n]]
    for row, lp in zip(rows, out, strict=True):
      row["ref_logp"] = lp

  def run(self, run: Any, workdir: str) -> None:
    out_dir = os.path.join(workdir, "candidates")
    os.makedirs(out_dir, exist_ok=True)
    chunks = -(-self.num_images // self.chunk)
    todo = [k for k in range(chunks) if not os.path.exists(_chunk_path(out_dir, k))]
    if jax.process_index() == 0:
      print(f"bigvl: candidates for {self.num_images} images of {self.task.dataset}:"
            f"{self.split} in {chunks} chunks ({chunks - len(todo)} done): prompts "
            f"{list(self.prompts)}, (temperature, top_p) {list(self.settings)} x {self.samples}"
            f", gt {sorted(self.gt)}, qa {self.qa_key} -> {out_dir}", flush=True)
    if todo:
      params = _common.load_params(run)
      for k in _common.progress(todo, len(todo), "candidates", unit="chunk"):
        rows = self.sample_chunk(params, k)
        self.score_rows(params, rows)
        if jax.process_index() == 0:
          _common.write_jsonl(_chunk_path(out_dir, k), rows)
    if jax.process_index() == 0:
      summary = summarize(out_dir)
      for path in (os.path.join(out_dir, "summary.json"), os.path.join(workdir, "results.json")):
        with open(path, "w") as f:  # results.json: the tool finished
          json.dump(summary, f, indent=2)
      print(f"bigvl: {summary['candidates']} candidates for {summary['images']} images "
            f"({summary['by_kind']}) in {out_dir}", flush=True)


class _Examples:
  """``{image, question, answer}`` examples of candidate rows (images read from the split)."""

  def __init__(self, source: Any, rows: Sequence[dict]):
    self._source, self._rows = source, rows

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict:
    row = self._rows[i]
    ex = self._source[row["image_index"]]
    return {"image": ex["image"], "question": row["question"], "answer": row["text"]}


def _chunk_path(out_dir: str, k: int) -> str:
  return os.path.join(out_dir, f"chunk_{k:05d}.jsonl")


def read_candidates(path: str) -> tuple[list[dict], int]:
  """Every candidate row of a candidates directory (or a workdir holding ``candidates/``) in
  chunk order, and the number of unreadable lines skipped."""
  if os.path.isdir(os.path.join(path, "candidates")):
    path = os.path.join(path, "candidates")
  files = sorted(glob.glob(os.path.join(path, "chunk_*.jsonl")))
  if not files:
    raise ConfigError(f"no candidate chunks (chunk_*.jsonl) in {path}: run the "
                      f"clip_dpo_candidates tool first")
  rows, bad = [], 0
  for f in files:
    r, b = _common.read_jsonl(f)
    rows += r
    bad += b
  return rows, bad


def summarize(path: str) -> dict[str, Any]:
  rows, bad = read_candidates(path)
  kinds: dict[str, int] = {}
  for r in rows:
    name = f"{r['kind']}/{r['source']}"
    kinds[name] = kinds.get(name, 0) + 1
  keys = {(r["image_index"], r["kind"], r["question"], r["text"], r["source"],
           r.get("temperature"), r.get("top_p"), r.get("sample")) for r in rows}
  return {"candidates": len(rows), "images": len({r["image_index"] for r in rows}),
          "by_kind": kinds, "unreadable_lines": bad,
          "duplicate_records": len(rows) - len(keys)}
