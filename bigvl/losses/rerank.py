"""Adaptive re-ranking loss of LFA (Linear Feature Alignment).

Ouali, Bulat, Martinez, Tzimiropoulos, "Black Box Few-Shot Adaptation for Vision-Language
models", ICCV 2023 (arXiv:2304.01752), Sec. 3.3; official code ``saic-fi/LFA``,
``alignment_utils.adaptive_reranking_loss``.

Pure ``jax.numpy`` functions of arrays; no flax. For mapped image features ``z = x W``
(``[N, D]``), their labels ``y`` (``[N]``) and the class prototypes ``t`` (``[C, D]``, e.g.
text embeddings of the class names), both sides L2-normalised here (``z`` is re-normalised
because ``W`` need not be orthogonal), with Euclidean (not squared) distances
``d(n, c) = |z_n - t_c|``:

    L = 1 / (N k) sum_n sum_{j in kNN(n)} max(0, d(n, y_n) + (1 - <t_j, t_{y_n}>) / s - d(n, j))

where ``kNN(n)`` are the ``k`` prototypes nearest to ``z_n`` (smallest ``d(n, .)``) and ``s`` is
the margin scale (official defaults ``k = 3``, ``s = 4``). The margin ``(1 - <t_j, t_y>) / s``
is adaptive: a wrong class whose prototype is close to the true one's (a semantically near
class) only has to be beaten by a small margin, a far one by a larger one.

As in the official code, ``kNN(n)`` is taken over *all* classes: when the true class is among
the ``k`` nearest, its term is ``max(0, d + 0 - d) = 0`` and still counts in the mean.
``exclude_positive=True`` takes the ``k`` nearest *wrong* classes instead (not the official
default).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigvl.losses.contrastive import l2_normalize

Array = jax.Array


def euclidean_distances(a: Array, b: Array) -> Array:
  """``[N, M]`` Euclidean distances ``|a_n - b_m|``, via ``|a|^2 + |b|^2 - 2 <a, b>`` (as
  ``torch.cdist`` does for large inputs), clipped at ``1e-12`` under the root so that the
  gradient stays finite when two vectors coincide."""
  sq = (jnp.sum(a * a, -1)[:, None] + jnp.sum(b * b, -1)[None, :]
        - 2.0 * jnp.einsum("nd,md->nm", a, b, preferred_element_type=jnp.float32))
  return jnp.sqrt(jnp.maximum(sq, 1e-12))


def rerank_loss_terms(x_mapped: Array, labels: Array, class_emb: Array, k: int = 3,
                      s: float = 4.0, exclude_positive: bool = False
                      ) -> tuple[Array, Array]:
  """Per-(anchor, neighbour) hinge terms of ``rerank_loss`` and the neighbours' class ids.

  Args:
    x_mapped: [N, D] mapped image features ``x W`` (any scale; L2-normalised here).
    labels: [N] int class of each row.
    class_emb: [C, D] class prototypes (L2-normalised here).
    k: number of nearest prototypes per anchor (``min(k, C)`` are used; with
      ``exclude_positive``, ``min(k, C - 1)``).
    s: margin scale; the margin against class j is ``(1 - <t_j, t_y>) / s``.
    exclude_positive: take the k nearest *wrong* classes (default: the k nearest of all
      classes, as the official code).
  Returns:
    terms: [N, k'] float32, ``max(0, d(n, y_n) + (1 - <t_j, t_y>) / s - d(n, j))``.
    neighbours: [N, k'] int32 class ids j, nearest first.
  """
  z = l2_normalize(x_mapped)
  t = l2_normalize(class_emb)
  num_classes = t.shape[0]
  d = euclidean_distances(z, t)                                    # [N, C]
  d_pos = jnp.take_along_axis(d, labels[:, None], axis=1)          # [N, 1]
  if exclude_positive:
    k = min(k, num_classes - 1)
    ranked = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), jnp.inf, d)
  else:
    k = min(k, num_classes)
    ranked = d
  _, nbrs = jax.lax.top_k(-jax.lax.stop_gradient(ranked), k)      # nearest first
  d_nbrs = jnp.take_along_axis(d, nbrs, axis=1)                    # [N, k]
  gram = jnp.einsum("cd,ed->ce", t, t, preferred_element_type=jnp.float32)   # [C, C]
  margins = (1.0 - jnp.take_along_axis(gram[labels], nbrs, axis=1)) / s        # [N, k]
  return jnp.maximum(d_pos + margins - d_nbrs, 0.0), nbrs


def rerank_loss(x_mapped: Array, labels: Array, class_emb: Array, k: int = 3,
                s: float = 4.0, exclude_positive: bool = False) -> Array:
  """LFA's adaptive re-ranking loss (module docstring): the mean over the ``N`` anchors and
  their ``k`` nearest prototypes of ``max(0, |z - t_y| + (1 - <t_j, t_y>) / s - |z - t_j|)``,
  ``z = x_mapped / |x_mapped|``, prototypes L2-normalised. Returns a float32 scalar."""
  terms, _ = rerank_loss_terms(x_mapped, labels, class_emb, k, s, exclude_positive)
  return jnp.mean(terms)
