"""The segmentation evaluator over a whole split (not divisible by the batch), through the
declared task interface only: its metrics equal a direct per-class numpy computation; the
Hungarian matching of clusters; the overlay PNGs; config errors."""

import os
import uuid

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from bigvl import parallel
from bigvl.config import ConfigError, Reader
from bigvl.data import sources
from bigvl.evaluators import segmentation
from bigvl.tasks import base

N, H, W, T, IGNORE = 37, 6, 5, 4, 255  # 37 examples: batches of 16 leave a partial last one
DATASET = f"embedded:segtest_{uuid.uuid4().hex[:8]}"


def _data():
  """Gray images that encode the truth: a scored pixel of class t has value 60 t + 10 + noise
  (noise in [0, 20)); ignored pixels (about 20%) any value."""
  rng = np.random.default_rng(0)
  masks = rng.integers(0, T, (N, H, W)).astype(np.int32)
  noise = rng.integers(0, 20, (N, H, W))
  images = 60 * masks + 10 + noise
  ignore = rng.random((N, H, W)) < 0.2
  masks[ignore] = IGNORE
  images[ignore] = rng.integers(0, 256, ignore.sum())
  return images.astype(np.uint8)[..., None], masks


IMAGES, MASKS = _data()
sources.register_embedded(
    DATASET.split(":", 1)[1],
    lambda split: [{"image": IMAGES[i], "mask": MASKS[i], "index": i} for i in range(N)],
    ("test",))


class _Task(base.Task):
  """Per-pixel scores ``lut[pixel value]``: a known function of the image (``lut [256, K]``)."""

  dataset = DATASET
  data_dir = "/nonexistent"  # embedded data needs none
  eval_kinds = ("image_mask",)

  def eval_transform(self, kind, **opts):
    return lambda ex: {"image": np.asarray(ex["image"]), "mask": np.asarray(ex["mask"], np.int32)}

  def predict_fns(self):
    def logits(params, state, batch):
      return params["lut"][batch["image"][..., 0].astype(jnp.int32)]
    return {"logits": logits}


class _NoMasks(_Task):
  eval_kinds = ("image_label",)


def _evaluator(task_cls=_Task, **cfg):
  mesh = parallel.make_mesh({"data": -1})
  cfg = {"batch_size": 16, **cfg}
  return segmentation.Evaluator(Reader(cfg, "config.evals.seg"),
                                base.EvalView(task_cls(Reader({}), mesh)), mesh)


def _lut_of(labels):
  """One-hot scores predicting ``labels[v]`` for pixel value v."""
  labels = np.asarray(labels)
  return jnp.asarray(np.eye(labels.max() + 1, dtype=np.float32)[labels])


def _direct(pred, truth, num_classes):
  """Metrics by per-class loops over the label maps (no confusion matrix)."""
  scored = truth != IGNORE
  out = {"pixel_accuracy": np.sum((pred == truth) & scored) / np.sum(scored)}
  accs, ious = [], []
  for c in range(num_classes):
    is_t, is_p = (truth == c) & scored, (pred == c) & scored
    if is_t.any():
      accs.append(np.sum(is_t & is_p) / np.sum(is_t))
    if (is_t | is_p).any():
      ious.append(np.sum(is_t & is_p) / np.sum(is_t | is_p))
      out[f"iou/{c}"] = ious[-1]
  out.update(mean_accuracy=np.mean(accs), miou=np.mean(ious))
  return out


def test_metrics_equal_a_direct_computation():
  lut = np.random.default_rng(1).normal(size=(256, T)).astype(np.float32)
  lut[np.arange(256), np.clip((np.arange(256) - 10) // 60, 0, T - 1)] += 0.8  # better than chance
  pred = np.argmax(lut[IMAGES[..., 0]], -1)
  for max_examples in (None, 20):
    ev = _evaluator(max_examples=max_examples)
    n = N if max_examples is None else max_examples
    want = _direct(pred[:n], MASKS[:n], T)
    assert 0.3 < want["pixel_accuracy"] < 0.95 and np.sum(MASKS[:n] == IGNORE) > 0
    out = ev.run({"lut": jnp.asarray(lut)})
    assert out.keys() == want.keys()
    for k, v in want.items():
      assert out[k] == pytest.approx(v, rel=1e-12), k
    # the public pieces give the same numbers from numpy label maps
    conf = segmentation.confusion_matrix(pred[:n], MASKS[:n], T, T, IGNORE)
    assert segmentation.scores(conf) == out


def test_hungarian_matches_a_permutation_of_the_classes():
  perm = np.array([1, 2, 3, 0])  # no fixed point: unmatched accuracy 0
  labels = perm[np.clip((np.arange(256) - 10) // 60, 0, T - 1)]
  params = {"lut": _lut_of(labels)}
  out = _evaluator(hungarian=True).run(params)
  assert out["pixel_accuracy"] == 1.0 and out["miou"] == 1.0 and out["mean_accuracy"] == 1.0
  assert out["num_clusters_used"] == T
  plain = _evaluator().run(params)
  assert plain["pixel_accuracy"] == 0.0 and plain["miou"] == 0.0


def _split_clusters():
  """6 clusters for 4 classes: the pixels of class 0 (1) with noise >= 15 form cluster 4 (5),
  the rest of class t cluster perm[t]."""
  perm = np.array([2, 0, 3, 1])
  v = np.arange(256)
  t, noise = np.clip((v - 10) // 60, 0, T - 1), (v - 10) % 60
  labels = np.where((noise >= 15) & (t < 2), 4 + t, perm[t])
  return perm, labels


def test_hungarian_unassigned_clusters_count_as_wrong():
  perm, labels = _split_clusters()
  out = _evaluator(hungarian=True, num_classes=T).run({"lut": _lut_of(labels)})
  scored = MASKS != IGNORE
  cluster = labels[IMAGES[..., 0]]
  extra = scored & (cluster >= T)
  assert 0 < extra.sum() < 0.5 * np.sum(scored & (MASKS < 2))
  assert out["pixel_accuracy"] == pytest.approx(1 - extra.sum() / scored.sum(), rel=1e-12)
  assert out["num_clusters_used"] == 6
  for c in range(T):  # a split class keeps only its main cluster's pixels
    is_t = scored & (MASKS == c)
    assert out[f"iou/{c}"] == pytest.approx(np.sum(is_t & ~extra) / is_t.sum(), rel=1e-12)
  # the same numbers from numpy label maps with the public pieces
  conf = segmentation.confusion_matrix(cluster, MASKS, 6, T, IGNORE)
  mapping = segmentation.hungarian_assignment(conf)
  want = np.full(6, -1)
  want[perm] = np.arange(T)
  np.testing.assert_array_equal(mapping, want)
  mapped = mapping[cluster]
  mapped[mapped < 0] = T
  direct = segmentation.scores(segmentation.confusion_matrix(mapped, MASKS, T + 1, T, IGNORE))
  assert direct == {k: v for k, v in out.items() if k != "num_clusters_used"}
  assert segmentation.scores(segmentation.remap_confusion(conf, mapping)) == direct


def test_overlays(tmp_path):
  _, labels = _split_clusters()
  ev = _evaluator(hungarian=True, num_classes=T, num_overlays=3)
  ev.run({"lut": _lut_of(labels)}, None, step=7, workdir=str(tmp_path))
  folder = tmp_path / "segmentation" / "seg"
  assert sorted(os.listdir(folder)) == [f"step_7_{i}.png" for i in range(3)]
  s = 16  # ceil(96 / 6)
  conf = segmentation.confusion_matrix(labels[IMAGES[..., 0]], MASKS, 6, T, IGNORE)
  mapping = segmentation.hungarian_assignment(conf)
  colors = segmentation.palette(T)
  for i in range(3):
    png = Image.open(folder / f"step_7_{i}.png")
    assert png.size == (3 * W * s, H * s) and png.mode == "RGB"
    strip = np.asarray(png)[::s, ::s]  # back to one pixel per label
    image, truth, pred = strip[:, :W], strip[:, W:2 * W], strip[:, 2 * W:]
    np.testing.assert_array_equal(image, np.repeat(IMAGES[i], 3, -1))  # gray
    want = colors[np.clip(MASKS[i], 0, T - 1)]
    want[MASKS[i] == IGNORE] = segmentation.IGNORE_COLOR
    np.testing.assert_array_equal(truth, want)
    shown = mapping[labels[IMAGES[i, ..., 0]]]
    want = colors[np.clip(shown, 0, None)]
    want[shown < 0] = segmentation.NO_CLASS_COLOR
    np.testing.assert_array_equal(pred, want)
  # distinct colours, none black or white
  many = segmentation.palette(300)
  assert len({tuple(c) for c in many}) == 300
  assert not ({tuple(c) for c in many} & {segmentation.IGNORE_COLOR, segmentation.NO_CLASS_COLOR})
  # no step or workdir (or num_overlays=0): nothing written
  _evaluator(num_overlays=0).run({"lut": _lut_of(labels)}, None, step=8, workdir=str(tmp_path))
  assert len(os.listdir(folder)) == 3


def test_figures_show_the_overlays_and_the_true_by_predicted_pixel_confusion(tmp_path):
  _, labels = _split_clusters()
  params = {"lut": _lut_of(labels)}
  ev = _evaluator(hungarian=True, num_classes=T, num_overlays=2)
  figs = ev.figures(params)
  assert set(figs) == {"overlays", "confusion"}
  ev.run(params, None, step=1, workdir=str(tmp_path))  # the same strips as the PNGs
  for i, ax in enumerate(figs["overlays"].axes):
    png = np.asarray(Image.open(tmp_path / "segmentation" / "seg" / f"step_1_{i}.png"))
    np.testing.assert_array_equal(ax.images[0].get_array(), png)
  # rows: true classes (+ an empty "none" row), columns: predicted classes + "none" (the
  # clusters Hungarian matching left unassigned)
  cluster = labels[IMAGES[..., 0]]
  mapping = segmentation.hungarian_assignment(
      segmentation.confusion_matrix(cluster, MASKS, 6, T, IGNORE))
  mapped = mapping[cluster]
  mapped[mapped < 0] = T
  scored = MASKS != IGNORE
  want = np.zeros((T + 1, T + 1))
  np.add.at(want, (MASKS[scored], mapped[scored]), 1)
  rates = want / np.maximum(want.sum(1, keepdims=True), 1)
  ax = figs["confusion"].axes[0]
  np.testing.assert_allclose(ax.images[0].get_array(), rates)
  assert [t.get_text() for t in ax.get_xticklabels()][-1] == "none"
  # a supervised model (as many classes as outputs, 6): a square matrix, no "none"
  plain = _evaluator().figures(params)["confusion"].axes[0]
  assert plain.images[0].get_array().shape == (6, 6)
  assert "none" not in [t.get_text() for t in plain.get_xticklabels()]


def test_pure_functions():
  rng = np.random.default_rng(2)
  pred, truth = rng.integers(0, 3, (50,)), rng.integers(0, 2, (50,))
  truth[:5] = -1
  conf = segmentation.confusion_matrix(pred, truth, 3, 2, ignore_label=-1)
  for p in range(3):
    for t in range(2):
      assert conf[p, t] == np.sum((pred == p) & (truth == t))
  assert conf.dtype == np.int64 and conf.sum() == 45
  with pytest.raises(ValueError, match="outside"):
    segmentation.confusion_matrix(pred, truth, 3, 2, ignore_label=None)
  # more classes than clusters: every cluster assigned, a class left without one
  mapping = segmentation.hungarian_assignment(np.array([[0, 5, 1], [4, 0, 0]]))
  np.testing.assert_array_equal(mapping, [1, 0])
  out = segmentation.scores(np.array([[3, 1], [0, 0]]), ["a", "b"])
  assert out == {"pixel_accuracy": 0.75, "mean_accuracy": 0.5, "miou": 0.375, "iou/a": 0.75,
                 "iou/b": 0.0}


def test_errors():
  for bad in ({"ignore_label": "255"}, {"ignore_label": True}, {"num_classes": 0},
              {"num_classes": -2}, {"num_classes": 3, "class_names": ["a", "b"]},
              {"class_names": ["a", "a", "b", "c"]}, {"num_overlays": -1},
              {"num_classes": 300, "ignore_label": 255}, {"max_examples": 0}):
    with pytest.raises(ConfigError):
      _evaluator(**bad)
  with pytest.raises(ConfigError, match="image_mask"):
    _evaluator(_NoMasks)
  with pytest.raises(ConfigError, match="predict_fn"):
    _evaluator(predict_fn="nope")
  with pytest.raises(ValueError, match="outside"):  # truth 3 with num_classes 3
    _evaluator(num_classes=3).run({"lut": _lut_of(np.zeros(256, int))})
