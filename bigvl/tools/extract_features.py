"""Extract the features black-box adaptation (LFA, ``bigvl.lfa``) works on from a two-tower
checkpoint: L2-normalised image embeddings of labeled splits and the class embeddings of the
dataset's class names under prompt templates (CLIP's zero-shot classifier).

For every split in ``extract.splits`` it writes ``<out>/<split>.npz`` (``np.savez``, no object
arrays, so it loads with ``allow_pickle=False``):

* ``features``: float32 ``[N, E]``, ``f_img(x) / |f_img(x)|`` in dataset order;
* ``labels``: int64 ``[N]``;
* ``class_embeddings``: float32 ``[C, E]``: per class ``c``, the L2-normalised mean over the
  templates ``p`` of ``f_txt(p.format(name_c)) / |f_txt(...)|`` (as the ``zeroshot``
  evaluator builds its classifier);
* ``class_names``: ``[C]`` unicode strings; ``templates``: ``[P]``.

This is exactly the input of ``python -m bigvl.lfa --train <out>/train.npz --test
<out>/test.npz``; features of any other model written in this layout work the same way.

Config: the two-tower's own training config (``task='two_tower'``: its dataset gives its
tokenizer) with ``init_from`` naming the trained checkpoint, ``tool='extract_features'`` and
``extract.{dataset (required: where the images are), splits (('train', 'test')), label_key
('label'), class_names (default: the names of the dataset's ``label_key`` ClassLabel, ``_`` ->
space), templates (default ``('a {}', 'a picture of a {}')``), lfa_dataset (one of the 11
standard datasets of ``bigvl.data.lfa_datasets``: its class names, templates and label ids,
e.g. Caltech101's two background labels dropped), batch_size (256), out (default
``<workdir>/features``)}``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import ConfigError, Reader, positive_int
from bigvl.data import sources
from bigvl.evaluators._embedding import embed_tokens, predict_split
from bigvl.evaluators.zeroshot import DEFAULT_PROMPTS, class_embeddings
from bigvl.tasks import lfa
from bigvl.tools import _common


def _names_of(info: Any, label_key: str, where: str) -> list[str]:
  try:
    names = info.features[label_key].names
  except Exception:  # noqa: BLE001
    raise ConfigError(f"{where}: the dataset has no ClassLabel {label_key!r}; give "
                      f"extract.class_names") from None
  return [n.replace("_", " ") for n in names]


class Tool:
  """See the module docstring."""

  def __init__(self, config: Reader, task: Any, mesh: Mesh):
    self._img, self._txt = _common.embedding_fns(task, "extract_features")
    if "image_label" not in task.eval_kinds:
      raise ConfigError(f"tool extract_features: task {type(task).__module__} has no "
                        f"'image_label' eval data")
    r = config.get("extract") or Reader({}, "config.extract")
    self.task, self.mesh = task, mesh
    self.dataset = r.typed("dataset", str, None)
    if not self.dataset:
      raise ConfigError("config.extract.dataset is not set: the labeled images to extract "
                        "features of (e.g. 'shapes_fewshot/shifted')")
    self.splits = tuple(r.typed("splits", (list, tuple), ("train", "test")))
    self.label_key = r.typed("label_key", str, "label")
    self.batch_size = positive_int(r, "batch_size", 256)
    parallel.batch_size_per_host(self.batch_size, mesh, f"{r.path}.batch_size")
    self.out = r.typed("out", str, None)
    self.sources = {}
    for split in self.splits:
      self.sources[split], info = sources.get_source(self.dataset, split, task.data_dir)
    names, templates = r.get("class_names"), r.get("templates")
    standard = r.typed("lfa_dataset", str, None)
    #: dataset label id -> class index (-1: not a class of the benchmark, dropped)
    self.label_table = None
    if standard:
      from bigvl.data import lfa_datasets

      try:
        names = names or lfa_datasets.class_names(standard)
        templates = templates or lfa_datasets.templates(standard)
        self.label_table = np.asarray(lfa_datasets.tfds_to_class(standard), np.int64)
      except KeyError as e:
        raise ConfigError(f"config.extract.lfa_dataset: {e.args[0]}") from None
    self.class_names = list(names) if names else _names_of(info, self.label_key, r.path)
    self.templates = tuple(templates or DEFAULT_PROMPTS)
    bad = [t for t in self.templates if t.count("{}") != 1]
    if bad:
      raise ConfigError(f"config.extract.templates: each needs exactly one '{{}}', got {bad}")
    self._rows = task.eval_transform("image_label", label_key=self.label_key)

  def class_embeddings(self, params: Any) -> np.ndarray:
    """``[C, E]`` zero-shot class embeddings (module docstring)."""
    texts = [t.format(c) for c in self.class_names for t in self.templates]
    tokens = self.task.encode_texts(texts)["tokens"]
    z = embed_tokens(self._txt, params, None, tokens, self.batch_size, self.mesh,
                     desc="extract: prompts")
    return class_embeddings(z, len(self.class_names), len(self.templates)).astype(np.float32)

  def features(self, params: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(features [N, E] L2-normalised, labels [N])`` of one split."""
    out = predict_split(self._img, params, None, self.sources[split], self._rows,
                        self.batch_size, self.mesh, desc=f"extract: {split}")
    z = lfa.normalize(out["out"])
    labels = out["label"].astype(np.int64)
    if self.label_table is not None:  # e.g. Caltech101 without its two background classes
      labels = self.label_table[labels]
      z, labels = z[labels >= 0], labels[labels >= 0]
    if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
      raise ConfigError(f"config.extract: labels of {self.dataset}:{split} run "
                        f"{labels.min()}..{labels.max()} but there are "
                        f"{len(self.class_names)} class names")
    return z, labels

  def run(self, run: Any, workdir: str) -> None:
    params = _common.load_params(run)
    out = os.path.expanduser(self.out or os.path.join(workdir, "features"))
    zcls = self.class_embeddings(params)
    for split in self.splits:
      feats, labels = self.features(params, split)
      if jax.process_index() != 0:
        continue
      os.makedirs(out, exist_ok=True)
      path = os.path.join(out, f"{split}.npz")
      tmp = f"{path}.tmp{os.getpid()}.npz"
      np.savez(tmp, features=feats, labels=labels, class_embeddings=zcls,
               class_names=np.asarray(self.class_names, dtype=str),
               templates=np.asarray(self.templates, dtype=str))
      os.replace(tmp, path)
      acc = float(np.mean(np.argmax(feats @ zcls.T, -1) == labels)) if len(labels) else 0.0
      print(f"bigvl: {self.dataset}:{split}: {len(labels)} features of dim {feats.shape[1]}"
            f", {len(self.class_names)} classes -> {path} (zero-shot accuracy {acc:.4f})",
            flush=True)
