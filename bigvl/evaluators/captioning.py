"""Captioning by generation, scored against the scene graph (``shapes_captions`` >= 1.2.0).

Uses only the declared task interface (``bigvl/tasks/base.py``): eval data of kind ``kind``
(default ``'image_prompt'``: ``{'image', 'prompt', 'prompt_mask'}`` per example, the prompt
left-padded), the prediction function ``predict_fn`` (default ``'generate'``: ``fn(params,
state, batch) -> generated ids [B, max_new]``, jitted here) and ``decode_texts(ids) -> [str]``.
References come from the split itself: ``captions`` (the paraphrases), ``caption`` (canonical),
``description`` and ``objects`` (the scene graph: colour and shape per object).

Metrics, over the first ``num_examples`` images of the split (a fixed set), texts compared
after :func:`normalize` (lower case, words and punctuation split by single spaces):

* ``exact_match``: the generated text equals one of the image's short captions (the
  paraphrases or the canonical one); ``exact_match_description``: equals its description.
* ``object_recall``: mean over images of ``|named & scene| / |scene|``, objects as
  ``(colour, shape)`` and named = every "<colour> <shape>" in the text (:func:`named_objects`).
* ``object_precision``: ``sum |named & scene| / sum |named|`` over all captions (micro; 0 if no
  caption names an object); ``hallucination_rate`` = ``sum |named - scene| / sum |named|``
  (CHAIR_i, Rohrbach et al. 2018); ``hallucinated_captions``: the fraction of captions naming
  an object not in the scene (CHAIR_s); ``no_object_rate``: captions naming none.
* ``chance_*``: the same metrics when each image is scored with the generated caption of
  another image of the set (a fixed random derangement, ``seed``): what the model's captions
  score without regard to the image. A captioner that looks at the image is above chance.
* ``mean_words``: the mean length of the generated texts in words.

Every generated caption, with its references and scores, is written to
``<workdir>/captions/step_<step>.jsonl`` (process 0) when the loop passes ``step`` and
``workdir`` to :meth:`Evaluator.run` (it does for evaluators with ``writes_outputs = True``).

Config (``config.evals.<name>``): ``type='captioning'``, ``every``, ``dataset`` (default: the
task's), ``split`` (``'test'``), ``num_examples`` (256), ``batch_size`` (global, 256),
``predict_fn`` (``'generate'``), ``kind`` (``'image_prompt'``), ``question`` (None: the task's
default; else passed as ``eval_transform(kind, question=...)``), ``seed`` (0: the chance
pairing).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import ConfigError, Reader, positive_int
from bigvl.data import pipeline
from bigvl.evaluators._embedding import Head
from bigvl.evaluators._split import EvalSplit, read_eval_split
from bigvl.tasks.base import EvalView

#: the object vocabulary of shapes_captions (kept here so scoring needs no TFDS import).
COLORS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "star")
_WORD_RE = re.compile(r"\w+|[^\w\s]+")

Object = tuple[str, str]


def normalize(text: str | bytes) -> str:
  """Lower case, words and punctuation marks separated by one space: ``"Two shapes: a red
  circle."`` -> ``"two shapes : a red circle ."`` (a word tokenizer's decoded text compares
  equal to the text it encoded)."""
  if isinstance(text, bytes):
    text = text.decode()
  return " ".join(_WORD_RE.findall(text.lower()))


def named_objects(text: str | bytes, colors: Sequence[str] = COLORS,
                  shapes: Sequence[str] = SHAPES) -> set[Object]:
  """The ``(colour, shape)`` objects a text names: every colour word directly followed by a
  shape word (a plural "circles" counts as "circle"). ``"a large red circle left of a blue
  square"`` -> ``{('red', 'circle'), ('blue', 'square')}``."""
  words = normalize(text).split()
  shape_of = {s: s for s in shapes} | {s + "s": s for s in shapes}
  return {(a, shape_of[b]) for a, b in zip(words, words[1:], strict=False)
          if a in colors and b in shape_of}


def scene_objects(objects: Any) -> set[Object]:
  """The scene graph's objects (``{'color': [...], 'shape': [...]}``, str or bytes) as a set."""
  def text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
  return {(text(c), text(s)) for c, s in zip(objects["color"], objects["shape"], strict=True)}


def derangement(n: int, seed: int = 0) -> np.ndarray:
  """A random permutation ``p`` of ``range(n)`` with ``p[i] != i`` for all i (n >= 2): a random
  cycle through all items."""
  if n < 2:
    raise ValueError(f"a derangement needs n >= 2, got {n}")
  order = np.random.default_rng(seed).permutation(n)
  p = np.empty(n, np.int64)
  p[order] = np.roll(order, -1)
  return p


def caption_scores(generated: str, scene: set[Object], references: Iterable[str] = (),
                   description: str | None = None) -> dict[str, Any]:
  """The scores of one caption: ``exact`` (equals a reference), ``exact_description``,
  ``named`` (sorted objects), ``hits`` / ``num_named`` / ``num_scene``, ``recall``."""
  named = named_objects(generated)
  gen = normalize(generated)
  hits = len(named & scene)
  return {"exact": gen in {normalize(r) for r in references},
          "exact_description": description is not None and gen == normalize(description),
          "named": sorted(named), "hits": hits, "num_named": len(named),
          "num_scene": len(scene), "recall": hits / len(scene) if scene else 1.0}


def score_captions(generated: Sequence[str], scenes: Sequence[set[Object]],
                   references: Sequence[Iterable[str]] | None = None,
                   descriptions: Sequence[str] | None = None) -> dict[str, float]:
  """The module's metrics (without ``chance_``) of ``generated[i]`` for image ``i``."""
  n = len(generated)
  if n == 0 or len(scenes) != n:
    raise ValueError(f"{n} captions for {len(scenes)} scenes")
  refs = references if references is not None else [()] * n
  descs = descriptions if descriptions is not None else [None] * n
  s = [caption_scores(g, sc, r, d) for g, sc, r, d in
       zip(generated, scenes, refs, descs, strict=True)]
  named = sum(x["num_named"] for x in s)
  hits = sum(x["hits"] for x in s)
  out = {"exact_match": np.mean([x["exact"] for x in s]),
         "object_recall": np.mean([x["recall"] for x in s]),
         "object_precision": hits / named if named else 0.0,
         "hallucination_rate": (named - hits) / named if named else 0.0,
         "hallucinated_captions": np.mean([x["num_named"] > x["hits"] for x in s]),
         "no_object_rate": np.mean([x["num_named"] == 0 for x in s]),
         "mean_words": np.mean([len(normalize(g).split()) for g in generated])}
  if descriptions is not None:
    out["exact_match_description"] = np.mean([x["exact_description"] for x in s])
  return {k: float(v) for k, v in out.items()}


def with_chance(generated: Sequence[str], scenes: Sequence[set[Object]],
                references: Sequence[Iterable[str]] | None = None,
                descriptions: Sequence[str] | None = None, seed: int = 0
                ) -> dict[str, float]:
  """:func:`score_captions`, plus ``chance_<metric>``: image ``i`` scored with the caption of
  image ``p[i]`` (:func:`derangement`); ``mean_words`` has no chance value."""
  out = score_captions(generated, scenes, references, descriptions)
  if len(generated) >= 2:
    p = derangement(len(generated), seed)
    chance = score_captions([generated[j] for j in p], scenes, references, descriptions)
    out.update({f"chance_{k}": v for k, v in chance.items() if k != "mean_words"})
  return out


def _texts(value: Any) -> list[str]:
  if isinstance(value, (str, bytes)):
    value = [value]
  return [v.decode() if isinstance(v, bytes) else str(v) for v in value]


def scene_graph_split(cfg: Reader, task: EvalView, mesh: Mesh, num_examples: int
                      ) -> tuple[EvalSplit, Head]:
  """The eval split (``read_eval_split``) and its first ``cfg.num_examples`` (default
  ``num_examples``) records; a ConfigError if the dataset has no scene graph (``objects``)."""
  split = read_eval_split(cfg, task, mesh)
  features = getattr(split.info, "features", None)
  if features is not None and "objects" not in features:
    raise ConfigError(f"{cfg.path}: dataset {split.dataset!r} has no scene graph ('objects'; "
                      f"shapes_captions >= 1.2.0 has); its features: {', '.join(features)}")
  return split, Head(split.source, positive_int(cfg, "num_examples", num_examples))


class Evaluator:
  """See the module docstring."""

  #: the loop passes ``step`` and ``workdir`` to :meth:`run` (captions are written there).
  writes_outputs = True

  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.task, self.mesh = task, mesh
    kind = cfg.typed("kind", str, "image_prompt")
    task.require_kind(kind, cfg.path)
    split, self.source = scene_graph_split(cfg, task, mesh, 256)
    self.dataset, self.batch_size = split.dataset, split.batch_size
    question = cfg.typed("question", str, None)
    self._transform = task.eval_transform(kind, **({} if question is None else
                                                   {"question": question}))
    name = cfg.typed("predict_fn", str, "generate")
    self._predict = jax.jit(task.predict_fn(name, f"{cfg.path}.predict_fn"))
    self.seed = cfg.typed("seed", int, 0)
    self._refs: list[dict] | None = None
    self.last_captions: list[dict] = []

  def references(self) -> list[dict]:
    """Per image, in order: ``caption`` (canonical), ``captions`` (every short reference),
    ``description`` (None before 1.2.0), ``scene`` (set of objects)."""
    if self._refs is None:
      refs, last = [], None
      for i in range(len(self.source)):
        ex = self.source[i]
        if ex is not None:
          caps = _texts(ex["captions"])
          canonical = _texts(ex["caption"])[0] if "caption" in ex else caps[0]
          last = {"caption": canonical, "captions": list(dict.fromkeys(caps + [canonical])),
                  "description": _texts(ex["description"])[0] if "description" in ex else None,
                  "scene": scene_objects(ex["objects"])}
        refs.append(last)  # an unreadable record is replaced by its predecessor, as in eval
      self._refs = refs
    return self._refs

  def generate(self, params: Any, state: Any) -> list[str]:
    """The decoded generated text of every image of the set, in order."""
    return generate_texts(self.task, self._predict, params, state, self.source,
                          self._transform, self.batch_size, self.mesh)

  def run(self, params: Any, state: Any = None, *, step: int | None = None,
          workdir: str | None = None) -> dict[str, float]:
    texts = self.generate(params, state)
    refs = self.references()
    descs = [r["description"] for r in refs]
    out = with_chance(texts, [r["scene"] for r in refs], [r["captions"] for r in refs],
                      descs if all(d is not None for d in descs) else None, self.seed)
    self.last_captions = [
        {"index": i, "generated": g, "reference": r["caption"],
         "references": r["captions"], "description": r["description"],
         "objects": [list(o) for o in sorted(r["scene"])],
         **{k: v for k, v in caption_scores(g, r["scene"], r["captions"]).items()
            if k in ("named", "recall", "exact")}}
        for i, (g, r) in enumerate(zip(texts, refs, strict=True))]
    if workdir is not None and step is not None and jax.process_index() == 0:
      write_captions(os.path.join(workdir, "captions", f"step_{int(step)}.jsonl"),
                     self.last_captions)
    return out


def generate_texts(task: EvalView, predict: Any, params: Any, state: Any, source: Any,
                   transform: Any, batch_size: int, mesh: Mesh) -> list[str]:
  """The decoded text ``predict`` (a jitted ``generate`` prediction function) writes for
  every record of ``source`` (rows by ``transform``), in order."""
  texts: list[str] = []
  for local, n in pipeline.eval_batches(source, transform, batch_size):
    batch = parallel.global_batch(local, mesh)
    ids = parallel.to_host(predict(params, state, batch))[:n]
    texts += [str(t) for t in task.decode_texts(np.asarray(ids))]
  return texts


def write_captions(path: str, rows: Sequence[dict]) -> None:
  """One JSON object per line, written atomically."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    for row in rows:
      f.write(json.dumps(row, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
              + "\n")
  os.replace(tmp, path)
