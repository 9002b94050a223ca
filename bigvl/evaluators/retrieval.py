"""Image <-> text retrieval Recall@K (as reported for COCO/Flickr by CLIP and SigLIP).

With C captions per image: image->text counts a hit when any of the image's captions ranks
in the top K of all N*C captions; text->image when a caption's image ranks in the top K of
the N images. Reports ``i2t_R@{1,5,10}``, ``t2i_R@{1,5,10}`` and ``chance_R@1`` (= 1/N).

Scene-aware recall (``scene_key``, e.g. ``'scene_id'`` of ``shapes_captions``): where several
images show the same scene (near duplicates with equivalent captions), the standard metric
counts a caption of a duplicate as a miss although it describes the query just as well. With
``scene_key`` set the evaluator also reports ``i2t_scene_R@K`` / ``t2i_scene_R@K``: a hit when
any item of the query's scene (a caption of any image with the same scene id, resp. any such
image) ranks in the top K, ties counting against the query as above, and
``i2t_scene_mAP`` / ``t2i_scene_mAP``: the mean average precision with every item of the
query's scene relevant (all of them must rank high, not just the best one).

Config: ``type='retrieval'``, ``every``, ``dataset``, ``split``, ``batch_size``,
``num_captions``, ``ks``, ``scene_key`` (default None: standard recall only), ``image_fn`` /
``text_fn`` (the task's prediction functions, see ``_embedding.py``).

:meth:`Evaluator.figures` draws the split's first images and their first captions: a gallery
(query caption -> its top-5 images) and the image x caption similarity heatmap.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.sharding import Mesh

from bigvl import plots
from bigvl.config import ConfigError, Reader
from bigvl.evaluators._embedding import Head, SplitEmbedder
from bigvl.tasks.base import EvalView


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
  """zimg: [N, E], ztxt: [N, C, E] -> Recall@K both ways (ties count against the query)."""
  i2t_rank, t2i_rank = retrieval_ranks(zimg, ztxt)
  out = {}
  for k in ks:
    out[f"i2t_R@{k}"] = float(np.mean(i2t_rank < k))
    out[f"t2i_R@{k}"] = float(np.mean(t2i_rank < k))
  out["chance_R@1"] = 1.0 / len(zimg)
  return out


def retrieval_ranks(zimg: np.ndarray, ztxt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """0-based ranks: [N] of each image's best own caption, [N*C] of each caption's image."""
  n, c, _ = ztxt.shape
  sims = zimg @ ztxt.reshape(n * c, -1).T  # [N, N*C]
  owner = np.repeat(np.arange(n), c)
  # i2t: rank of the best positive caption = number of negatives scoring >= it.
  pos_best = np.max(np.where(owner[None, :] == np.arange(n)[:, None], sims, -np.inf), axis=1)
  neg = np.where(owner[None, :] != np.arange(n)[:, None], sims, -np.inf)
  i2t_rank = np.sum(neg >= pos_best[:, None], axis=1)
  # t2i: rank of the caption's image among all images.
  pos = sims[owner, np.arange(n * c)]
  t2i_rank = np.sum(sims >= pos[None, :], axis=0) - 1
  return i2t_rank, t2i_rank


def scene_recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, scene: np.ndarray,
                      ks: tuple[int, ...]) -> dict[str, float]:
  """Recall@K where every item of the query's scene is correct.

  zimg: [N, E], ztxt: [N, C, E] (captions of image i in ``ztxt[i]``), scene: [N] scene ids.
  Image->text: rank = the number of captions of other scenes scoring >= the best caption of the
  query's scene; text->image: the number of images of other scenes scoring >= the best image of
  the caption's scene.
  """
  n, c, _ = ztxt.shape
  sims = zimg @ ztxt.reshape(n * c, -1).T  # [N, N*C]
  same = scene[:, None] == np.repeat(scene, c)[None, :]  # [N, N*C]
  pos_best = np.max(np.where(same, sims, -np.inf), axis=1)
  i2t_rank = np.sum(np.where(same, -np.inf, sims) >= pos_best[:, None], axis=1)
  pos_best_img = np.max(np.where(same, sims, -np.inf), axis=0)
  t2i_rank = np.sum(np.where(same, -np.inf, sims) >= pos_best_img[None, :], axis=0)
  out = {}
  for k in ks:
    out[f"i2t_scene_R@{k}"] = float(np.mean(i2t_rank < k))
    out[f"t2i_scene_R@{k}"] = float(np.mean(t2i_rank < k))
  out["i2t_scene_mAP"] = float(np.mean(average_precision(sims, same)))
  out["t2i_scene_mAP"] = float(np.mean(average_precision(sims.T, same.T)))
  return out


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  """[Q] average precision of each query (row) ranking all items by ``scores [Q, M]`` with
  ``relevant [Q, M]`` bool: ``AP = 1/R sum_{r: item at rank r relevant} P@r`` (``R`` relevant
  items, ``P@r`` the fraction of relevant items in the top r; ranks from a stable sort of
  -score). Every item of the query's scene counts, so a model scores high only by ranking
  all equivalent items (e.g. every rendering of one scene graph) above the rest."""
  order = np.argsort(-scores, axis=1, kind="stable")
  rel = np.take_along_axis(relevant, order, axis=1).astype(np.float64)
  hits = np.cumsum(rel, axis=1)
  precision = hits / np.arange(1, scores.shape[1] + 1)[None, :]
  return np.sum(precision * rel, axis=1) / np.maximum(rel.sum(axis=1), 1.0)


class Evaluator:
  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.embedder = SplitEmbedder(cfg, task, mesh)
    self.ks = tuple(cfg.get("ks", (1, 5, 10)))
    self.scene_key = cfg.typed("scene_key", str, None)
    self._scene = None
    if self.scene_key is not None:
      info = self.embedder.info
      features = getattr(info, "features", None)
      if features is not None and self.scene_key not in features:
        raise ConfigError(f"{cfg.path}.scene_key={self.scene_key!r} is not a feature of "
                          f"{self.embedder.dataset}: {', '.join(features)}")

  def scene_ids(self) -> np.ndarray:
    """[N] scene ids of the split, in the embedder's order (read once)."""
    if self._scene is None:
      ids, last = [], None
      for i in range(len(self.embedder.source)):
        ex = self.embedder.source[i]
        last = np.asarray(ex[self.scene_key]).item() if ex is not None else last
        ids.append(last)  # an unreadable record is replaced by its predecessor, as embedded
      self._scene = np.asarray(ids)
    return self._scene

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    emb = self.embedder.embed(params, state)
    out = recall_at_k(emb["zimg"], emb["ztxt"], self.ks)
    if self.scene_key is not None:
      out.update(scene_recall_at_k(emb["zimg"], emb["ztxt"], self.scene_ids(), self.ks))
    return out

  def figures(self, params: Any, state: Any = None, num_examples: int = 24,
              num_queries: int = 4) -> dict[str, Any]:
    """``{'gallery', 'similarity'}`` over the split's first ``num_examples`` pairs (each
    image's first caption): text -> image top-5 for the first ``num_queries`` captions, and
    the ``[images, captions]`` cosine similarities (the diagonal holds the true pairs)."""
    emb = self.embedder.embed(params, state, source=Head(self.embedder.source, num_examples),
                              keep_inputs=True)
    sims = emb["zimg"] @ emb["ztxt"][:, 0].T  # [N images, N captions]
    q = min(num_queries, len(sims))
    try:
      captions = self.embedder.task.decode_texts(emb["tokens"][:q, 0])
    except ConfigError:  # a task whose text inputs do not decode (e.g. prompted LVLM rows)
      captions = [f"caption of image {i}" for i in range(q)]
    return {"gallery": plots.retrieval_gallery(captions, emb["image"], sims.T[:q],
                                               targets=range(q)),
            "similarity": plots.similarity_heatmap(sims)}
