"""Image <-> text retrieval Recall@K (as reported for COCO/Flickr by CLIP and SigLIP).

With C captions per image: image->text counts a hit when any of the image's captions ranks
in the top K of all N*C captions; text->image when a caption's image ranks in the top K of
the N images. Reports ``i2t_R@{1,5,10}``, ``t2i_R@{1,5,10}`` and ``chance_R@1`` (= 1/N).

Config: ``type='retrieval'``, ``every``, ``dataset``, ``split``, ``batch_size``,
``num_captions``, ``ks``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.sharding import Mesh

from bigvl.config import Reader
from bigvl.evaluators._embedding import SplitEmbedder


def recall_at_k(zimg: np.ndarray, ztxt: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
  """zimg: [N, E], ztxt: [N, C, E] -> Recall@K both ways (ties count against the query)."""
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
  out = {}
  for k in ks:
    out[f"i2t_R@{k}"] = float(np.mean(i2t_rank < k))
    out[f"t2i_R@{k}"] = float(np.mean(t2i_rank < k))
  out["chance_R@1"] = 1.0 / n
  return out


class Evaluator:
  def __init__(self, cfg: Reader, task: Any, mesh: Mesh):
    self.embedder = SplitEmbedder(cfg, task, mesh)
    self.ks = tuple(cfg.get("ks", (1, 5, 10)))

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    emb = self.embedder.embed(params)
    return recall_at_k(emb["zimg"], emb["ztxt"], self.ks)
