"""Object hallucination of an LVLM on scene-graph data (``shapes_captions`` >= 1.2.0): POPE,
AMBER's generative metrics and zero-shot classification by answer likelihood.

Uses only the declared task interface (``bigvl/tasks/base.py``):

* eval kind ``'image_answer'``: ``eval_transform('image_answer')`` -> ``fn(example)`` for an
  example ``{'image' uint8 [H, W, 3], 'question': str, 'answer': str}`` (the question named,
  ``'caption'`` / ``'description'``, or literal text) -> ``{'image' float32 [H, W, 3],
  'tokens' int32 [L], 'loss_mask' int32 [L]}`` (fixed ``L``); the prediction function
  ``logprob_fn`` (default ``'answer_logprobs'``): ``fn(params, state, batch) -> float32 [B]``,
  the summed log-probability of the answer tokens given image and question. Every
  multiple-choice decision below is the argmax of it over the choices.
* eval kind ``'image_prompt'``: ``eval_transform('image_prompt', question=Q)`` -> ``{image,
  prompt [P], prompt_mask [P]}``; ``predict_fn`` (default ``'generate'``) -> generated ids
  ``[B, max_new]``; ``decode_texts(ids) -> [str]``.

Objects are ``(colour, shape)`` pairs (:func:`bigvl.evaluators.captioning.scene_objects`); an
image's true objects ``T_i`` come from its scene graph (``objects``), the objects a text
mentions from :func:`bigvl.evaluators.captioning.named_objects`. The evaluation set is the
first ``num_examples`` images of ``split``. **Statistics** come from the first
``stats_examples`` scenes of ``stats_split`` (read once, on first use; :func:`object_stats`):
``freq(o)`` = the number of scenes holding ``o``, ``cooc(a, b)`` = the number holding both
``a != b``. The vocabulary ``V`` = every object of those scenes and of the evaluation scenes.

**POPE** (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models";
:func:`pope_questions`, :func:`pope_metrics`). Per image, yes/no questions
``pope.question.format(object='<colour> <shape>')``: positives (truth yes) = up to
``pope.per_image`` true objects (a seeded sample), and as many negatives (truth no) from
``V - T_i`` by kind:

* ``random``: a uniform sample (``seed``);
* ``popular``: the most frequent absent objects, by ``freq``;
* ``adversarial``: the absent objects that co-occur most with the image's objects, by
  ``sum_{t in T_i} cooc(t, o)``.

The model says yes iff ``logp('yes') > logp('no')``. With yes the positive class, TP / FP /
TN / FN over all questions of a kind: ``accuracy = (TP + TN) / N``, ``precision = TP / (TP +
FP)``, ``recall = TP / (TP + FN)``, ``f1 = 2 P R / (P + R)`` (0 where a denominator is 0),
``yes_ratio = (TP + FP) / N``; keys ``pope_<kind>/<metric>``, and ``pope/f1`` = the mean F1
over ``pope.kinds``.

**AMBER generative metrics** (Wang et al. 2023, "AMBER: An LLM-free Multi-dimensional
Benchmark for MLLMs Hallucination Evaluation"; :func:`amber_metrics`). The model generates
with ``caption.question``; per caption ``M_i`` = mentioned objects, ``H_i = M_i - T_i``:

* ``chair = sum_i |H_i| / sum_i |M_i|`` (0 if nothing is mentioned; CHAIR_i, Rohrbach et al.
  2018);
* ``cover = mean_i |M_i & T_i| / |T_i|``;
* ``hal`` = the fraction of captions with ``|H_i| >= 1``;
* ``cog = sum_i |C_i| / sum_i |M_i|``, ``C_i = {h in H_i : h in top_k(t) for some t in T_i}``
  with ``top_k(t)`` the ``caption.cooc_top_k`` objects co-occurring most with ``t``
  (:func:`top_cooccurring`): hallucinations of the kind a human's co-occurrence bias makes;
* ``mean_words``: the mean generated length in words.

Every caption, with its true, mentioned, hallucinated and cog objects, is written to
``<workdir>/hallucination/step_<step>.jsonl`` (process 0) when the loop passes ``step`` and
``workdir`` (``writes_outputs = True``).

**Zero-shot classification** through the LVLM: per image, ``logp`` of the answer
``zeroshot.answer.format(name=c)`` to ``zeroshot.question`` for every class name ``c`` of the
``label`` feature; prediction ``argmax_c`` (with ``zeroshot.length_norm``: ``logp / #words``);
``zeroshot/accuracy`` against ``label``. No key if the dataset has no ``label``.

Config (``config.evals.<name>``): ``type='hallucination'``, ``every``, ``dataset`` (default:
the task's), ``split`` (``'test'``), ``num_examples`` (128), ``batch_size`` (global, 64),
``seed`` (0), ``stats_split`` (``'train'``), ``stats_examples`` (2000), ``predict_fn``
(``'generate'``), ``logprob_fn`` (``'answer_logprobs'``); ``pope``: ``enabled`` (True),
``question`` (``'is there a {object} in the image ?'``: the shapes tokenizer is word-level,
so words and punctuation are separated by spaces), ``per_image`` (3), ``kinds``
(``('random', 'popular', 'adversarial')``); ``caption``: ``enabled`` (True), ``question``
(``'description'``), ``cooc_top_k`` (1); ``zeroshot``: ``enabled`` (True), ``question``
(``'caption'``), ``answer`` (``'a {name}'``), ``length_norm`` (False).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import pipeline, sources
from bigvl.evaluators._embedding import Head
from bigvl.evaluators.captioning import (
  Object,
  generate_texts,
  named_objects,
  normalize,
  scene_graph_split,
  scene_objects,
  score_captions,
  write_captions,
)
from bigvl.tasks.base import EvalView

POPE_KINDS = ("random", "popular", "adversarial")
POPE_QUESTION = "is there a {object} in the image ?"
Cooc = dict[Object, Counter]


# --- pure functions -----------------------------------------------------------------------


def object_stats(scenes: Iterable[set[Object]]) -> tuple[Counter, Cooc]:
  """``(freq, cooc)``: ``freq[o]`` = the number of scenes holding ``o``; ``cooc[a][b]`` = the
  number holding both ``a`` and ``b != a`` (symmetric; only objects that occur are keys)."""
  freq: Counter = Counter()
  cooc: Cooc = {}
  for scene in scenes:
    scene = set(scene)
    freq.update(scene)
    for a in scene:
      cooc.setdefault(a, Counter()).update(b for b in scene if b != a)
  return freq, cooc


def top_cooccurring(cooc: Cooc, obj: Object, k: int) -> list[Object]:
  """The ``k`` objects seen most often with ``obj`` (count > 0; ties by name)."""
  counts = cooc.get(obj, Counter())
  return [o for o, c in sorted(counts.items(), key=lambda oc: (-oc[1], oc[0])) if c > 0][:k]


def _negatives(scene: set[Object], vocab: Sequence[Object], freq: Counter, cooc: Cooc,
               kind: str, n: int, rng: np.random.Generator) -> list[Object]:
  absent = [o for o in vocab if o not in scene]
  n = min(n, len(absent))
  if kind == "random":
    return [absent[j] for j in sorted(rng.choice(len(absent), size=n, replace=False))]
  if kind == "popular":
    return sorted(absent, key=lambda o: (-freq[o], o))[:n]
  if kind == "adversarial":
    score = {o: sum(cooc.get(t, Counter())[o] for t in scene) for o in absent}
    return sorted(absent, key=lambda o: (-score[o], o))[:n]
  raise ValueError(f"unknown POPE kind {kind!r}; kinds: {', '.join(POPE_KINDS)}")


def pope_questions(scenes: Sequence[set[Object]], vocab: Sequence[Object], freq: Counter,
                   cooc: Cooc, kind: str, per_image: int, seed: int
                   ) -> list[tuple[int, Object, bool]]:
  """POPE's questions (module docstring): ``(image_index, object, truth)``, per image its
  positives (a sample of up to ``per_image`` true objects, the same for every kind), then as
  many negatives of ``kind`` (fewer only if ``vocab`` has too few absent objects).
  Deterministic given ``seed``."""
  out: list[tuple[int, Object, bool]] = []
  for i, scene in enumerate(scenes):
    true = sorted(scene)
    pick = np.random.default_rng([seed, i]).choice(len(true), size=min(per_image, len(true)),
                                                   replace=False)
    positives = [true[j] for j in sorted(pick)]
    negatives = _negatives(scene, vocab, freq, cooc, kind, len(positives),
                           np.random.default_rng([seed, i, 1]))
    out += [(i, o, True) for o in positives] + [(i, o, False) for o in negatives]
  return out


def pope_metrics(labels: Sequence[bool], predictions: Sequence[bool]) -> dict[str, float]:
  """``accuracy``, ``precision``, ``recall``, ``f1`` (yes is the positive class) and
  ``yes_ratio`` of yes/no ``predictions`` against the truth ``labels``."""
  y, p = np.asarray(labels, bool), np.asarray(predictions, bool)
  if y.shape != p.shape or y.size == 0:
    raise ValueError(f"{p.size} predictions for {y.size} labels")
  tp, fp, fn = int(np.sum(p & y)), int(np.sum(p & ~y)), int(np.sum(~p & y))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"accuracy": float(np.mean(p == y)), "precision": precision, "recall": recall,
          "f1": f1, "yes_ratio": float(np.mean(p))}


def amber_caption(text: str, scene: set[Object], cooc: Cooc, top_k: int
                  ) -> dict[str, list[Object]]:
  """One caption's ``mentioned``, ``hallucinated`` (mentioned, not in ``scene``) and ``cog``
  objects (hallucinated and among the ``top_k`` co-occurring objects of a true one), sorted."""
  mentioned = named_objects(text)
  hallucinated = mentioned - scene
  likely = {o for t in scene for o in top_cooccurring(cooc, t, top_k)}
  return {"mentioned": sorted(mentioned), "hallucinated": sorted(hallucinated),
          "cog": sorted(hallucinated & likely)}


def amber_metrics(texts: Sequence[str], scenes: Sequence[set[Object]], cooc: Cooc,
                  top_k: int = 1) -> dict[str, float]:
  """``chair``, ``cover``, ``hal``, ``cog`` and ``mean_words`` of ``texts[i]`` for image ``i``
  (module docstring); CHAIR, Cover, Hal and the length are
  :func:`bigvl.evaluators.captioning.score_captions`' metrics."""
  base = score_captions(texts, scenes)
  rows = [amber_caption(t, s, cooc, top_k) for t, s in zip(texts, scenes, strict=True)]
  mentioned = sum(len(r["mentioned"]) for r in rows)
  return {"chair": base["hallucination_rate"], "cover": base["object_recall"],
          "hal": base["hallucinated_captions"],
          "cog": sum(len(r["cog"]) for r in rows) / mentioned if mentioned else 0.0,
          "mean_words": base["mean_words"]}


# --- the evaluator ------------------------------------------------------------------------


class _Rows:
  """A list-backed random-access source of ``{'image', 'question', 'answer'}`` examples."""

  def __init__(self, images: Sequence[np.ndarray], rows: Sequence[tuple[int, str, str]]):
    self._images, self._rows = images, rows

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, i: int) -> dict[str, Any]:
    j, question, answer = self._rows[i]
    return {"image": self._images[j], "question": question, "answer": answer}


def _group(cfg: Reader, name: str) -> Reader:
  sub = cfg.get(name)
  if sub is None:
    return Reader({}, f"{cfg.path}.{name}")
  if not isinstance(sub, Reader):
    raise ConfigError(f"{cfg.path}.{name} must be a dict of settings, got {sub!r}")
  return sub


def _template(cfg: Reader, name: str, default: str, field: str) -> str:
  value = cfg.typed(name, str, default)
  try:
    value.format(**{field: "x"})
  except (KeyError, IndexError, ValueError):
    raise ConfigError(f"{cfg.path}.{name}={value!r} may hold only the field {{{field}}}"
                      ) from None
  if f"{{{field}}}" not in value:
    raise ConfigError(f"{cfg.path}.{name}={value!r} must hold {{{field}}}")
  return value


def _name(obj: Object) -> str:
  return f"{obj[0]} {obj[1]}"


class Evaluator:
  """See the module docstring."""

  #: the loop passes ``step`` and ``workdir`` to :meth:`run` (captions are written there).
  writes_outputs = True

  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.task, self.mesh = task, mesh
    split, self.source = scene_graph_split(cfg, task, mesh, 128)
    self.dataset, self.batch_size = split.dataset, split.batch_size
    features = getattr(split.info, "features", None)
    self.seed = cfg.typed("seed", int, 0)
    if self.seed < 0:
      raise ConfigError(f"{cfg.path}.seed must be >= 0, got {self.seed}")
    stats_split = cfg.typed("stats_split", str, "train")
    stats_examples = positive_int(cfg, "stats_examples", 2000)

    pope = _group(cfg, "pope")
    self.pope = pope.typed("enabled", bool, True)
    self.pope_question = _template(pope, "question", POPE_QUESTION, "object")
    self.per_image = positive_int(pope, "per_image", 3)
    kinds = pope.get("kinds", POPE_KINDS)
    if not isinstance(kinds, (list, tuple)) or not kinds or len(set(kinds)) != len(kinds):
      raise ConfigError(f"{pope.path}.kinds must be distinct kinds of {POPE_KINDS}, got "
                        f"{kinds!r}")
    self.kinds = tuple(check_choice(f"{pope.path}.kinds", k, POPE_KINDS) for k in kinds)

    caption = _group(cfg, "caption")
    self.caption = caption.typed("enabled", bool, True)
    caption_question = caption.typed("question", str, "description")
    self.top_k = positive_int(caption, "cooc_top_k", 1)

    zeroshot = _group(cfg, "zeroshot")
    self.zeroshot = zeroshot.typed("enabled", bool, True)
    self.zs_question = zeroshot.typed("question", str, "caption")
    zs_answer = _template(zeroshot, "answer", "a {name}", "name")
    self.length_norm = zeroshot.typed("length_norm", bool, False)
    names = None
    if features is not None and "label" in features:
      names = list(getattr(features["label"], "names", None) or []) or None
    self.zs_answers = ([zs_answer.format(name=n.replace("_", " ")) for n in names]
                       if self.zeroshot and names else [])

    generate_fn = cfg.typed("predict_fn", str, "generate")
    logprob_fn = cfg.typed("logprob_fn", str, "answer_logprobs")
    if not (self.pope or self.caption or self.zeroshot):
      raise ConfigError(f"{cfg.path}: pope, caption and zeroshot are all disabled")
    if self.pope or self.zs_answers:
      task.require_kind("image_answer", cfg.path)
      self._answer_transform = task.eval_transform("image_answer")
      self._logprobs = jax.jit(task.predict_fn(logprob_fn, f"{cfg.path}.logprob_fn"))
    if self.pope or self.caption:
      self._stats_source = Head(sources.get_source(self.dataset, stats_split, task.data_dir)[0],
                                stats_examples)
    if self.caption:
      task.require_kind("image_prompt", cfg.path)
      self._prompt_transform = task.eval_transform("image_prompt", question=caption_question)
      self._generate = jax.jit(task.predict_fn(generate_fn, f"{cfg.path}.predict_fn"))
    self._refs: list[dict] | None = None
    self._stats: tuple[Counter, Cooc] | None = None
    self.last_captions: list[dict] = []

  def references(self) -> list[dict]:
    """Per image of the set, in order: ``scene`` (set of objects), ``label`` (or None) and
    ``image`` (as read)."""
    if self._refs is None:
      refs, last = [], None
      for i in range(len(self.source)):
        ex = self.source[i]
        if ex is not None:
          last = {"scene": scene_objects(ex["objects"]), "label": ex.get("label"),
                  "image": np.asarray(ex["image"])}
        refs.append(last)  # an unreadable record is replaced by its predecessor, as in eval
      self._refs = refs
    return self._refs

  def stats(self) -> tuple[Counter, Cooc]:
    """:func:`object_stats` of the statistics split (read once)."""
    if self._stats is None:
      scenes = (self._stats_source[i] for i in range(len(self._stats_source)))
      self._stats = object_stats(scene_objects(ex["objects"]) for ex in scenes
                                 if ex is not None)
    return self._stats

  def vocabulary(self) -> list[Object]:
    """Every object of the statistics scenes and of the evaluation scenes, sorted."""
    freq, _ = self.stats()
    return sorted(set(freq).union(*(r["scene"] for r in self.references())))

  def answer_logprobs(self, params: Any, state: Any, rows: Sequence[tuple[int, str, str]]
                      ) -> np.ndarray:
    """``[len(rows)]``: the task's ``logprob_fn`` of ``(image_index, question, answer)``."""
    images = [r["image"] for r in self.references()]
    out = [np.zeros(0, np.float32)]
    for local, n in pipeline.eval_batches(_Rows(images, rows), self._answer_transform,
                                          self.batch_size):
      batch = parallel.global_batch(local, self.mesh)
      out.append(np.asarray(parallel.to_host(self._logprobs(params, state, batch)))[:n])
    return np.concatenate(out)

  def generate(self, params: Any, state: Any) -> list[str]:
    """The decoded generated text of every image of the set, in order."""
    return generate_texts(self.task, self._generate, params, state, self.source,
                          self._prompt_transform, self.batch_size, self.mesh)

  def run(self, params: Any, state: Any = None, *, step: int | None = None,
          workdir: str | None = None) -> dict[str, float]:
    refs = self.references()
    scenes = [r["scene"] for r in refs]
    out: dict[str, float] = {}
    rows: list[tuple[int, str, str]] = []
    pope: dict[str, list[tuple[int, Object, bool]]] = {}
    if self.pope:
      freq, cooc = self.stats()
      vocab = self.vocabulary()
      for kind in self.kinds:
        pope[kind] = pope_questions(scenes, vocab, freq, cooc, kind, self.per_image, self.seed)
        rows += [(i, self.pope_question.format(object=_name(o)), a)
                 for i, o, _ in pope[kind] for a in ("yes", "no")]
    zs = bool(self.zs_answers) and all(r["label"] is not None for r in refs)
    if zs:
      rows += [(i, self.zs_question, a) for i in range(len(refs)) for a in self.zs_answers]
    scores = self.answer_logprobs(params, state, rows) if rows else np.zeros(0, np.float32)

    start = 0
    for kind, questions in pope.items():
      yes_no = scores[start:start + 2 * len(questions)].reshape(-1, 2)
      start += 2 * len(questions)
      res = pope_metrics([t for _, _, t in questions], yes_no[:, 0] > yes_no[:, 1])
      out.update({f"pope_{kind}/{k}": v for k, v in res.items()})
    if pope:
      out["pope/f1"] = float(np.mean([out[f"pope_{k}/f1"] for k in pope]))
    if zs:
      logp = scores[start:].reshape(len(refs), len(self.zs_answers))
      if self.length_norm:
        logp = logp / np.asarray([max(len(normalize(a).split()), 1) for a in self.zs_answers])
      pred = np.argmax(logp, axis=1)
      out["zeroshot/accuracy"] = float(np.mean(pred == np.asarray([r["label"] for r in refs])))

    if self.caption:
      texts = self.generate(params, state)
      _, cooc = self.stats()
      out.update(amber_metrics(texts, scenes, cooc, self.top_k))
      self.last_captions = [
          {"index": i, "generated": t, "objects": [list(o) for o in sorted(s)],
           **{k: [list(o) for o in v] for k, v in amber_caption(t, s, cooc, self.top_k).items()}}
          for i, (t, s) in enumerate(zip(texts, scenes, strict=True))]
      if workdir is not None and step is not None and jax.process_index() == 0:
        write_captions(os.path.join(workdir, "hallucination", f"step_{int(step)}.jsonl"),
                       self.last_captions)
    return out
