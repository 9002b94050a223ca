"""Zero-shot classification (CLIP, Radford et al. 2021): class names -> prompts -> the mean
of their L2-normalised text embeddings per class -> each image's class is
``argmax_c <zimg, zclass_c>``. Reports top-1 accuracy and chance level.

Config (``config.evals.<name>``): ``type='zeroshot'``, ``every``, ``dataset``, ``split``,
``batch_size``, ``prompts`` (templates with ``{}``), ``class_names`` (default: the dataset's
``label`` feature names), ``label_key``, ``image_fn`` / ``text_fn`` (the task's prediction
functions, see ``_embedding.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.sharding import Mesh

from bigvl import plots
from bigvl.config import ConfigError, Reader
from bigvl.evaluators._confusion import confusion_matrix
from bigvl.evaluators._embedding import SplitEmbedder
from bigvl.models.two_tower import l2_normalize
from bigvl.tasks.base import EvalView

DEFAULT_PROMPTS = ("a {}", "a picture of a {}")


def class_embeddings(ztxt: np.ndarray, num_classes: int, num_prompts: int) -> np.ndarray:
  """[C*P, E] (class-major) -> [C, E]: the normalised mean over each class's prompts."""
  z = ztxt.reshape(num_classes, num_prompts, -1).mean(axis=1)
  return np.asarray(l2_normalize(z))


class Evaluator:
  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.embedder = SplitEmbedder(cfg, task, mesh)
    self.prompts = tuple(cfg.get("prompts", DEFAULT_PROMPTS))
    names = cfg.get("class_names", None)
    if names is None:
      label = cfg.typed("label_key", str, "label")
      info = self.embedder.info
      try:
        names = info.features[label].names
      except Exception:  # noqa: BLE001
        raise ConfigError(f"{cfg.path}: dataset has no ClassLabel {label!r}; give "
                          f"class_names") from None
    self.class_names = [n.replace("_", " ") for n in names]

  def predictions(self, params: Any, state: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted class [N], labels [N])`` in dataset order."""
    texts = [p.format(c) for c in self.class_names for p in self.prompts]
    zcls = class_embeddings(self.embedder.embed_texts(params, state, texts),
                            len(self.class_names), len(self.prompts))
    emb = self.embedder.embed(params, state, texts=False)
    return np.argmax(emb["zimg"] @ zcls.T, axis=1), emb["label"]

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    pred, label = self.predictions(params, state)
    return {"accuracy": float(np.mean(pred == label)), "chance": 1.0 / len(self.class_names)}

  def figures(self, params: Any, state: Any = None) -> dict[str, Any]:
    """``{'confusion'}``: the zero-shot confusion matrix over the split."""
    pred, label = self.predictions(params, state)
    n = len(self.class_names)
    c = confusion_matrix(pred, label, n, n, ignore_label=None).T  # [true, predicted]
    return {"confusion": plots.confusion_figure(c, self.class_names, "zero-shot")}
