"""The compositionality evaluator end to end: on ``shapes_captions/small`` through fake tasks
whose embeddings make the answer known (a bag-of-words text model ties on every swap, which
counts as wrong; an order-aware one gets everything right), on SugarCrepe-format files, and a
smoke run of the real tiny SigLIP two-tower task."""

from __future__ import annotations

import hashlib
import json

import jax
import ml_collections
import numpy as np
import pytest

from bigvl import parallel, train
from bigvl.config import ConfigError, Reader
from bigvl.data import hard_negatives as hn
from bigvl.data.builders import shapes_captions as sc
from bigvl.evaluators import compositionality
from bigvl.tasks.base import EvalView, Task
from tests.helpers import tiny_config

E = 64
VOCAB = sc.vocabulary()


def _vec(key: str) -> np.ndarray:
  seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
  return np.random.default_rng(seed).normal(size=E)


def bag_of_words(text: str) -> np.ndarray:
  """Word counts over the dataset's vocabulary: blind to word order."""
  v = np.zeros(len(VOCAB))
  for w in sc.WORD_RE.findall(text):
    v[VOCAB.index(w)] += 1
  return v


def bound_features(text: str) -> np.ndarray:
  """Order-aware: a fixed vector per named (colour, shape) object plus one for the (first
  object, relation, second object) triple."""
  mentions, rel = hn.parse_caption(text)
  feats = [f"{c} {s}" for c, s in mentions] + ([f"{mentions[0]} {rel} {mentions[1]}"]
                                                if rel else [])
  return sum(_vec(f) for f in feats)


class _FakeTask(Task):
  """Image embedding: ``text_model`` of the scene's true caption; text embedding:
  ``text_model`` of the text. ``tokens`` carry the embeddings, the predict fns are the
  identity."""

  eval_kinds = ("image_text",)

  def __init__(self, data_dir, text_model):
    super().__init__(None, None)
    self.dataset, self.data_dir, self.text_model = "shapes_captions/small", data_dir, text_model
    self.dim = len(text_model("a red circle"))

  def predict_fns(self):
    return {"embed_images": lambda params, state, batch: batch["image"],
            "embed_texts": lambda params, state, batch: batch["tokens"]}

  def eval_transform(self, kind, num_captions=1):
    assert kind == "image_text"

    def fn(ex):
      truth = hn.true_caption(hn.scene_objects(ex["objects"]))
      return {"image": self.text_model(truth).astype(np.float32),
              "tokens": np.zeros((num_captions, self.dim), np.float32)}
    return fn

  def encode_texts(self, texts):
    return {"tokens": np.stack([self.text_model(t) for t in texts]).astype(np.float32)}


def _mesh():
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  assert mesh.size == 8
  return mesh


def _reader(**cfg):
  return Reader(ml_collections.ConfigDict(cfg), "config.evals.comp")


def _expected_counts(data_dir, n):
  from bigvl.data import sources

  source, _ = sources.get_source("shapes_captions/small", "test", data_dir)
  counts = dict.fromkeys(hn.NEGATIVE_TYPES, 0)
  for i in range(n):
    for kind, _ in hn.hard_negatives(source[i]["objects"]):
      counts[kind] += 1
  return counts


def test_pair_accuracy_counts_a_tie_as_wrong():
  zimg = np.array([[1.0, 0.0]])
  ztxt = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # text 1 = text 0 after normalising
  got = compositionality.pair_accuracy(zimg, ztxt, np.array([0, 0, 0]), np.array([0, 0, 2]),
                                       np.array([1, 2, 0]))
  assert got.tolist() == [False, True, False]


def test_bag_of_words_ties_on_swaps_order_aware_is_right(shapes_data_dir):
  mesh = _mesh()
  n = 100  # of 128 test images; 100 % 48: the last batch is padded
  want = _expected_counts(shapes_data_dir, n)
  assert all(c > 30 for c in want.values()), want
  results = {}
  for name, model in (("bow", bag_of_words), ("bound", bound_features)):
    ev = compositionality.Evaluator(_reader(batch_size=48, num_examples=n),
                                    EvalView(_FakeTask(shapes_data_dir, model)), mesh)
    results[name] = ev.run(None, None)
  for res in results.values():
    assert res["chance"] == 0.5
    assert {t: res[f"num_{t}"] for t in hn.NEGATIVE_TYPES} == want
  bow = results["bow"]
  assert bow["accuracy_swap_attribute"] == 0.0 and bow["accuracy_swap_object"] == 0.0
  assert bow["accuracy_replace_relation"] == 1.0  # "left" vs "right" are different words
  assert bow["accuracy"] == pytest.approx(1 / 3)
  bound = results["bound"]
  assert all(bound[f"accuracy_{t}"] == 1.0 for t in hn.NEGATIVE_TYPES)
  assert bound["accuracy"] == 1.0


def test_every_negative_and_config_errors(shapes_data_dir):
  mesh = _mesh()
  view = EvalView(_FakeTask(shapes_data_dir, bag_of_words))
  res = compositionality.Evaluator(_reader(batch_size=64, max_per_type=0), view, mesh).run(
      None, None)
  one = compositionality.Evaluator(_reader(batch_size=64), view, mesh).run(None, None)
  assert res["num_swap_attribute"] > one["num_swap_attribute"]
  assert res["num_replace_relation"] == one["num_replace_relation"]  # one per scene at most
  with pytest.raises(ConfigError, match="image_root"):
    compositionality.Evaluator(_reader(batch_size=64, sugarcrepe_dir="/nonexistent"), view,
                               mesh)
  with pytest.raises(ConfigError, match="sugarcrepe_dir"):
    compositionality.Evaluator(_reader(batch_size=64, image_root="/x"), view, mesh)


RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0)}


class _ColourTask(Task):
  """Image embedding: the mean colour (checks the image arrives at the split's 32x32);
  text embedding: the colour of the first colour word (none: a fixed other direction)."""

  eval_kinds = ("image_text",)

  def __init__(self, data_dir):
    super().__init__(None, None)
    self.dataset, self.data_dir = "shapes_captions/small", data_dir

  def predict_fns(self):
    return {"embed_images": lambda params, state, batch: batch["image"],
            "embed_texts": lambda params, state, batch: batch["tokens"]}

  def eval_transform(self, kind, num_captions=1):
    def fn(ex):
      assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
      return {"image": np.append(ex["image"].reshape(-1, 3).mean(0) / 255, 0).astype(np.float32),
              "tokens": np.zeros((num_captions, 4), np.float32)}
    return fn

  def encode_texts(self, texts):
    def emb(t):
      c = next((w for w in t.split() if w in RGB), None)
      return np.array([*RGB[c], 0.0]) if c else np.array([0.0, 0.0, 0.0, 1.0])
    return {"tokens": np.stack([emb(t) for t in texts]).astype(np.float32)}


def test_sugarcrepe_files(shapes_data_dir, tmp_path):
  from PIL import Image

  root = tmp_path / "val2017"
  root.mkdir()
  for name, colour in (("r.png", (255, 0, 0)), ("g.png", (0, 255, 0))):
    Image.new("RGB", (50, 40), colour).save(root / name)  # not the task's size
  swap = {"0": {"filename": "r.png", "caption": "a red cup", "negative_caption": "a blue cup"},
          "1": {"filename": "g.png", "caption": "a green cup", "negative_caption": "a red cup"},
          "2": {"filename": "r.png", "caption": "a cup that is red",
                "negative_caption": "a red cup"}}  # same colour: a tie, wrong
  rel = {"0": {"filename": "g.png", "caption": "a green cup",
               "negative_caption": "a cup"}}
  sdir = tmp_path / "sugarcrepe"
  sdir.mkdir()
  (sdir / "swap_att.json").write_text(json.dumps(swap))
  (sdir / "replace_rel.json").write_text(json.dumps(rel))
  ev = compositionality.Evaluator(
      _reader(batch_size=8, sugarcrepe_dir=str(sdir), image_root=str(root)),
      EvalView(_ColourTask(shapes_data_dir)), _mesh())
  res = ev.run(None, None)
  assert res == {"num_replace_relation": 1.0, "accuracy_replace_relation": 1.0,
                 "num_swap_attribute": 3.0, "accuracy_swap_attribute": pytest.approx(2 / 3),
                 "accuracy": pytest.approx(5 / 6), "chance": 0.5}
  assert len({r["image"] for r in ev.records()}) == 2  # each image embedded once


def test_tiny_siglip_two_tower_smoke(shapes_data_dir, tmp_path):
  c = tiny_config(shapes_data_dir, **{"mesh.data": 1})
  c.evals = ml_collections.ConfigDict(
      {"comp": {"type": "compositionality", "batch_size": 32, "num_examples": 40}})
  run = train.build(c, devices=jax.devices()[:1])
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  state = train.compile_run(run, batch).init(batch)
  [(name, ev, _)] = run.evaluators
  res = ev.run(train.model_params(state), state["extra"])
  keys = {f"{k}_{t}" for k in ("accuracy", "num") for t in hn.NEGATIVE_TYPES}
  assert set(res) == keys | {"accuracy", "chance"}
  assert all(0.0 <= res[k] <= 1.0 for k in res if not k.startswith("num_"))
  assert all(res[f"num_{t}"] > 5 for t in hn.NEGATIVE_TYPES)
  assert res["accuracy"] == pytest.approx(
      np.mean([res[f"accuracy_{t}"] for t in hn.NEGATIVE_TYPES]))
  # SugarCrepe files through the same task: real-image sizes are resized to its 32x32.
  from PIL import Image

  Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.jpg")
  (tmp_path / "swap_obj.json").write_text(json.dumps({"0": {
      "filename": "a.jpg", "caption": "a red circle left of a blue square",
      "negative_caption": "a red square left of a blue circle"}}))
  ev = compositionality.Evaluator(
      _reader(batch_size=32, sugarcrepe_dir=str(tmp_path / "swap_obj.json"),
              image_root=str(tmp_path)), EvalView(run.task), run.mesh)
  res = ev.run(train.model_params(state), state["extra"])
  assert res["num_swap_object"] == 1 and res["accuracy"] in (0.0, 1.0)
