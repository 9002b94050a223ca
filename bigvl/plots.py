"""Figures of a run, for people who would rather look than read: training curves from
``metrics.jsonl``, a retrieval gallery, a similarity heatmap, a confusion matrix and image
strips. The train loop (curves at the end of every run), ``python -m bigvl.eval`` and
``notebooks/evaluate.ipynb`` all draw with these functions.

matplotlib runs on its ``Agg`` canvas (no display needed; a notebook shows the returned
figures inline). Every function takes plain numpy arrays and returns a ``Figure``;
:func:`save` writes one as a PNG atomically and closes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

#: metrics.jsonl keys drawn as training curves, in this order, when logged.
TRAIN_CURVES = ("loss", "lr", "grad_norm")
#: file name of the training curves written into ``<workdir>/plots`` after every run.
CURVES_PNG = "training_curves.png"


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
  from matplotlib.figure import Figure

  fig = Figure(figsize=size, layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def save(fig: Any, path: str) -> str:
  """Writes ``fig`` to ``path`` (PNG, written to a temporary name and renamed) and returns
  the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png", dpi=100)
  os.replace(tmp, path)
  return path


def to_png(fig: Any) -> bytes:
  """The PNG bytes of ``fig`` (``IPython.display.Image(data=...)`` shows them inline)."""
  import io

  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  return buf.getvalue()


# --- training curves ----------------------------------------------------------------------
def series(rows: Sequence[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{key: (steps, values)}`` of every scalar in metrics.jsonl rows, each sorted by step
  with a later row of the same step (a resumed run) replacing an earlier one; non-finite
  values are kept (they show as gaps)."""
  by_key: dict[str, dict[int, float]] = {}
  for row in rows:
    step = int(row.get("step", 0))
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):
        by_key.setdefault(k, {})[step] = float(v)
  return {k: (np.array(sorted(d)), np.array([d[s] for s in sorted(d)]))
          for k, d in by_key.items()}


def curve_panels(keys: Sequence[str]) -> list[tuple[str, list[str]]]:
  """Which curves share a panel: one panel per :data:`TRAIN_CURVES` key present, then one
  per evaluator (``<eval>/<metric>`` keys grouped by ``<eval>``; chance levels and counts,
  ``chance*`` / ``num_*``, left out)."""
  panels = [(k, [k]) for k in TRAIN_CURVES if k in keys]
  evals: dict[str, list[str]] = {}
  for k in keys:
    if "/" in k and not k.split("/", 1)[1].startswith(("chance", "num_")):
      evals.setdefault(k.split("/", 1)[0], []).append(k)
  return panels + sorted(evals.items())


def training_curves(rows: Sequence[dict], title: str | None = None) -> Any | None:
  """Loss, learning rate, gradient norm and each evaluator's metrics over steps (one panel
  each, up to 3 a row); None when ``rows`` hold none of them."""
  data = series(rows)
  panels = curve_panels(list(data))
  if not panels:
    return None
  ncols = min(3, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  fig, axes = _figure(nrows, ncols, (4.2 * ncols, 3.0 * nrows))
  for ax, (name, keys) in zip(axes.flat, panels, strict=False):
    for k in keys:
      steps, values = data[k]
      style = "-" if len(steps) > 1 else "o"
      ax.plot(steps, values, style, label=k.split("/", 1)[-1], lw=1.4, ms=4)
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if name == "loss" and np.all(data["loss"][1][np.isfinite(data["loss"][1])] > 0):
      ax.set_yscale("log")
    if len(keys) > 1:
      ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  return fig


def write_training_curves(workdir: str) -> str | None:
  """Draws ``<workdir>/metrics.jsonl`` into ``<workdir>/plots/training_curves.png``; returns
  the path (None without metrics)."""
  from bigvl import metrics

  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  fig = training_curves(metrics.read_jsonl(path), title=os.path.basename(
      os.path.normpath(workdir)))
  return None if fig is None else save(fig, os.path.join(workdir, "plots", CURVES_PNG))


# --- evaluation figures -------------------------------------------------------------------
def _show_image(ax: Any, image: np.ndarray) -> None:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype != np.uint8:  # model-range floats -> [0, 1] for display
    lo, hi = float(np.min(image)), float(np.max(image))
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
  ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def retrieval_gallery(queries: Sequence[str], images: np.ndarray, sims: np.ndarray,
                      targets: Sequence[int] | None = None, k: int = 5) -> Any:
  """Text -> image retrieval, one row per query caption: its top-``k`` images by similarity.

  queries: Q captions; images: ``[N, H, W, C]``; sims: ``[Q, N]`` caption-image scores;
  targets: the index of each query's own image (its hit is framed green, others grey)."""
  sims = np.asarray(sims)
  k = min(k, sims.shape[1])
  fig, axes = _figure(len(queries), k + 1, (1.9 * (k + 1.6), 1.9 * len(queries)))
  for q, query in enumerate(queries):
    top = np.argsort(-sims[q], kind="stable")[:k]
    text_ax = axes[q, 0]
    text_ax.axis("off")
    text_ax.text(0.0, 0.5, _wrap(query, 28), va="center", ha="left", fontsize=8)
    for j, idx in enumerate(top):
      ax = axes[q, j + 1]
      _show_image(ax, images[idx])
      hit = targets is not None and int(idx) == int(targets[q])
      for spine in ax.spines.values():
        spine.set_edgecolor("tab:green" if hit else "0.7")
        spine.set_linewidth(3 if hit else 1)
      ax.set_title(f"#{j + 1}  {sims[q, idx]:.2f}", fontsize=7)
  fig.suptitle(f"text -> image: top-{k} images per caption (own image framed green)",
               fontsize=9)
  return fig


def _wrap(text: str, width: int) -> str:
  words, lines, line = text.split(), [], ""
  for w in words:
    if line and len(line) + 1 + len(w) > width:
      lines.append(line)
      line = w
    else:
      line = f"{line} {w}".strip()
  return "\n".join(lines + [line])


def similarity_heatmap(sims: np.ndarray, title: str = "image-caption similarity",
                       xlabel: str = "caption", ylabel: str = "image") -> Any:
  """``sims [N, M]`` as a heatmap (a trained contrastive model shows a bright diagonal)."""
  sims = np.asarray(sims)
  fig, axes = _figure(1, 1, (5.2, 4.4))
  ax = axes[0, 0]
  im = ax.imshow(sims, cmap="viridis", interpolation="nearest")
  fig.colorbar(im, ax=ax, shrink=0.8)
  ax.set_title(title, fontsize=9)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  return fig


def confusion_figure(confusion: np.ndarray, class_names: Sequence[str] | None = None,
                     title: str = "confusion matrix") -> Any:
  """``confusion [true, predicted]`` counts (the transpose of
  ``evaluators._confusion.confusion_matrix``) drawn row-normalised, counts written in the cells
  when there are at most 20 classes."""
  c = np.asarray(confusion, np.float64)
  n = c.shape[0]
  rates = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
  side = min(12.0, 2.5 + 0.45 * n)
  fig, axes = _figure(1, 1, (side + 1.2, side))
  ax = axes[0, 0]
  im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
  fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
  names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
  if n <= 40:
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
  if n <= 20:
    for t in range(n):
      for p in range(n):
        if c[t, p]:
          ax.text(p, t, int(c[t, p]), ha="center", va="center", fontsize=6,
                  color="white" if rates[t, p] > 0.5 else "black")
  acc = np.trace(c) / max(c.sum(), 1)
  ax.set_title(f"{title} (accuracy {acc:.3f})", fontsize=9)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  return fig


def image_strips(strips: Sequence[np.ndarray], title: str, captions: Sequence[str] = ()
                 ) -> Any:
  """Stacked RGB strips (e.g. segmentation overlays: input | truth | prediction)."""
  fig, axes = _figure(len(strips), 1, (7.0, 2.4 * len(strips)))
  for i, strip in enumerate(strips):
    _show_image(axes[i, 0], strip)
    if i < len(captions):
      axes[i, 0].set_title(captions[i], fontsize=8)
  fig.suptitle(title, fontsize=9)
  return fig
