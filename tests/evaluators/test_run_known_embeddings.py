"""The retrieval and zero-shot evaluators' ``run``, end to end on a real eval split
(``shapes_captions/small`` test: 128 images x 5 captions) through a task whose embeddings are
known: the evaluator's batching (a padded last batch), sharding over 8 devices, gathering,
caption layout and ranking must give what a brute-force numpy pass over the split gives."""

import hashlib

import ml_collections
import numpy as np
import pytest

from bigvl import parallel
from bigvl.config import Reader
from bigvl.evaluators import retrieval, zeroshot
from bigvl.tasks.base import EvalView, Task

E = 16
PROMPTS = ("a {}", "a picture of a {}")


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _noise(key: bytes, scale: float) -> np.ndarray:
  """A fixed random vector per byte string."""
  seed = int.from_bytes(hashlib.sha256(key).digest()[:8], "little")
  return scale * np.random.default_rng(seed).normal(size=E)


class _KnownEmbeddings(Task):
  """Image embedding: its class's vector plus noise from its pixels; caption embedding: the
  image's plus noise from the caption text; prompt embedding: the named class's vector plus
  noise from the prompt. The prediction functions are the identity on these."""

  eval_kinds = ("image_text",)

  def __init__(self, data_dir, class_names):
    super().__init__(None, None)
    self.dataset, self.data_dir = "shapes_captions/small", data_dir
    self.class_names = list(class_names)
    self.classes = np.random.default_rng(0).normal(size=(len(class_names), E))

  def image_embedding(self, ex):
    return _unit(self.classes[ex["label"]] + _noise(ex["image"].tobytes(), 1.5))

  def caption_embeddings(self, ex, num_captions):
    zimg = self.image_embedding(ex)
    return np.stack([_unit(zimg + _noise(bytes(c), 0.5))
                     for c in ex["captions"][:num_captions]])

  def predict_fns(self):
    return {"embed_images": lambda params, state, batch: batch["image"],
            "embed_texts": lambda params, state, batch: batch["tokens"]}

  def eval_transform(self, kind, num_captions=1):
    assert kind == "image_text"
    return lambda ex: {"image": self.image_embedding(ex).astype(np.float32),
                       "tokens": self.caption_embeddings(ex, num_captions).astype(np.float32),
                       "label": np.int32(ex["label"])}

  def encode_texts(self, texts):
    out = []
    for t in texts:
      c = max((n for n in self.class_names if t.endswith(n)), key=len)
      out.append(_unit(self.classes[self.class_names.index(c)] + _noise(t.encode(), 0.8)))
    return {"tokens": np.asarray(out, np.float32)}


def _setup(data_dir, **cfg):
  from bigvl.data import sources

  source, info = sources.get_source("shapes_captions/small", "test", data_dir)
  task = _KnownEmbeddings(data_dir, [n.replace("_", " ") for n in info.features["label"].names])
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.size == 8 and len(source) % cfg["batch_size"]  # the last batch is padded
  return task, EvalView(task), mesh, Reader(ml_collections.ConfigDict(cfg), "config.evals.x"), \
      [source[i] for i in range(len(source))]


def _brute_force_recall(zimg, ztxt, k):
  """Image i hits if one of its captions is among the k most similar of all captions (stable
  order); caption j hits if its image is among the k most similar images."""
  n, c, _ = ztxt.shape
  flat = ztxt.reshape(n * c, -1)
  i2t = np.mean([any(j // c == i for j in np.argsort(-(flat @ zimg[i]), kind="stable")[:k])
                 for i in range(n)])
  t2i = np.mean([j // c in np.argsort(-(zimg @ flat[j]), kind="stable")[:k]
                 for j in range(n * c)])
  return i2t, t2i


def test_retrieval_run_matches_brute_force(shapes_data_dir):
  task, view, mesh, cfg, examples = _setup(shapes_data_dir, batch_size=48, num_captions=5,
                                           ks=(1, 5))
  ev = retrieval.Evaluator(cfg, view, mesh)
  got = ev.run(None, None)
  zimg = np.stack([task.image_embedding(ex) for ex in examples])
  ztxt = np.stack([task.caption_embeddings(ex, 5) for ex in examples])
  assert got["chance_R@1"] == pytest.approx(1 / 128)
  for k in (1, 5):
    i2t, t2i = _brute_force_recall(zimg, ztxt, k)
    assert got[f"i2t_R@{k}"] == pytest.approx(i2t, abs=1e-9), k
    assert got[f"t2i_R@{k}"] == pytest.approx(t2i, abs=1e-9), k
  assert 0.05 < got["i2t_R@1"] < 0.95 and 0.05 < got["t2i_R@1"] < 0.95  # not a trivial case


def test_zeroshot_run_matches_numpy(shapes_data_dir):
  task, view, mesh, cfg, examples = _setup(shapes_data_dir, batch_size=48, prompts=PROMPTS)
  got = zeroshot.Evaluator(cfg, view, mesh).run(None, None)
  prompts = np.stack([[task.encode_texts([p.format(c)])["tokens"][0] for p in PROMPTS]
                      for c in task.class_names])  # [C, P, E]
  zcls = _unit(prompts.mean(axis=1))
  zimg = np.stack([task.image_embedding(ex) for ex in examples])
  labels = np.array([ex["label"] for ex in examples])
  want = np.mean(np.argmax(zimg @ zcls.T, axis=1) == labels)
  assert got["chance"] == pytest.approx(1 / len(task.class_names))
  assert got["accuracy"] == pytest.approx(want, abs=1e-9)
  assert 0.2 < want < 0.95  # not a trivial case
  # its figure: the row-normalised confusion of the same predictions (true x predicted)
  ax = zeroshot.Evaluator(cfg, view, mesh).figures(None, None)["confusion"].axes[0]
  n = len(task.class_names)
  conf = np.zeros((n, n))
  np.add.at(conf, (labels, np.argmax(zimg @ zcls.T, axis=1)), 1)
  np.testing.assert_allclose(ax.images[0].get_array(),
                             conf / np.maximum(conf.sum(1, keepdims=True), 1))
  assert f"accuracy {want:.3f}" in ax.get_title()
