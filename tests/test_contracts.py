"""The declared task interface: evaluators see only ``EVAL_CONTRACT``; an evaluator that does
not fit the task, or names a prediction function the task lacks, is a config error."""

import sys
import types

import jax
import numpy as np
import pytest

from bigvl import parallel, registry, train
from bigvl.config import ConfigError
from bigvl.tasks import base
from tests.helpers import tiny_config


def _install_evaluator(monkeypatch, name, body):
  """Registers ``bigvl.evaluators.<name>`` whose constructor runs ``body(task)``."""
  mod = types.ModuleType(f"bigvl.evaluators.{name}")

  class Evaluator:
    def __init__(self, cfg, task, mesh):
      cfg.mark_read(*cfg.keys())
      body(task)

    def run(self, params, state=None):
      return {}

  mod.Evaluator = Evaluator
  monkeypatch.setitem(sys.modules, mod.__name__, mod)
  real = registry.available
  monkeypatch.setattr(registry, "available",
                      lambda pkg: real(pkg) + ([name] if pkg == "evaluators" else []))


def _config(data_dir, evals):
  c = tiny_config(data_dir)
  c.evals = evals
  return c


def test_evaluator_touching_an_undeclared_task_attribute_fails(shapes_data_dir, monkeypatch):
  _install_evaluator(monkeypatch, "sneaky", lambda task: task.tokenizer)
  c = _config(shapes_data_dir, {"x": {"type": "sneaky", "every": 1}})
  with pytest.raises(AttributeError, match="'tokenizer' is not part of it"):
    train.build(c)


def test_evaluator_using_the_declared_interface_works(shapes_data_dir, monkeypatch):
  seen = {}

  def body(task):
    seen["fns"] = sorted(task.predict_fns())
    seen["kinds"] = task.eval_kinds
    seen["dataset"] = task.dataset
    seen["tokens"] = task.encode_texts(["a red circle"])["tokens"]

  _install_evaluator(monkeypatch, "polite", body)
  train.build(_config(shapes_data_dir, {"x": {"type": "polite", "every": 1}}))
  assert seen["fns"] == ["embed_images", "embed_texts"]
  assert seen["kinds"] == ("image_text", "image_label")
  assert seen["dataset"] == "shapes_captions/small"
  assert seen["tokens"].shape == (1, 16) and seen["tokens"].dtype == np.int32


def test_eval_view_refuses_writes_and_undeclared_reads(shapes_data_dir):
  run = train.build(tiny_config(shapes_data_dir))
  view = base.EvalView(run.task)
  for name in ("model", "transform", "tokenizer", "max_len", "loss", "init"):
    with pytest.raises(AttributeError):
      getattr(view, name)
  with pytest.raises(TypeError):
    view.dataset = "other"
  for name in base.EVAL_CONTRACT:
    getattr(view, name)


def test_evaluator_that_does_not_fit_the_task_is_a_config_error(shapes_data_dir):
  c = _config(shapes_data_dir, {"seg": {"type": "segmentation", "every": 1}})
  with pytest.raises(ConfigError, match="config.evals.seg: needs eval data 'image_mask'"):
    train.build(c)
  # a kind the task has, a prediction function it lacks (two-tower images have no logits)
  c = _config(shapes_data_dir, {"acc": {"type": "classification", "every": 1}})
  with pytest.raises(ConfigError, match="predict_fn='logits'.*embed_images, embed_texts"):
    train.build(c)


def test_unknown_prediction_function_is_a_config_error(shapes_data_dir):
  c = _config(shapes_data_dir, {"r": {"type": "retrieval", "every": 1, "batch_size": 64,
                                      "image_fn": "embed_imgs"}})
  with pytest.raises(ConfigError, match="image_fn='embed_imgs'.*embed_images, embed_texts"):
    train.build(c)


def test_prediction_functions_are_pure_and_jittable(shapes_data_dir):
  """``predict_fns()`` entries give the model's embeddings for a batch dict, under jit."""
  run = train.build(tiny_config(shapes_data_dir))
  batch = parallel.global_batch(next(run.task.train_data(0)), run.mesh)
  params, state = parallel.unbox(run.task.init(jax.random.PRNGKey(0), batch))
  fns = run.task.predict_fns()
  tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
  zimg = jax.jit(fns["embed_images"])(params, state, {"image": batch["image"]})
  ztxt = jax.jit(fns["embed_texts"])(params, state, {"tokens": tokens})
  want_img, want_txt, _, _ = run.task.model.apply({"params": params}, batch["image"], tokens)
  np.testing.assert_allclose(zimg, want_img, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ztxt, want_txt, rtol=1e-5, atol=1e-6)
