"""The classification evaluator's accuracy over a whole split (not divisible by the batch)
equals numpy's on the same predictions, through the declared task interface only."""

import jax.numpy as jnp
import numpy as np

from bigvl import parallel
from bigvl.config import Reader
from bigvl.data import sources
from bigvl.evaluators import classification
from bigvl.tasks import base


class _Task(base.Task):
  """Predicts class ``clip(round(mean pixel / scale), 0, 9)``: a known function of the image."""

  dataset = "embedded:digits8x8"
  data_dir = "/nonexistent"  # embedded data needs none
  eval_kinds = ("image_label",)

  def eval_transform(self, kind, **opts):
    return lambda ex: {"image": np.asarray(ex["image"]), "label": np.int32(ex["label"])}

  def predict_fns(self):
    def logits(params, state, batch):
      m = jnp.mean(batch["image"].astype(jnp.float32), axis=(1, 2, 3))
      c = jnp.clip(jnp.round(m / params["scale"]), 0, 9)
      return -jnp.abs(jnp.arange(10)[None, :] - c[:, None])
    return {"logits": logits}


def _numpy_accuracy(scale):
  src, _ = sources.get_source("embedded:digits8x8", "test")
  imgs = np.stack([np.asarray(src[i]["image"]) for i in range(len(src))]).astype(np.float32)
  labels = np.array([src[i]["label"] for i in range(len(src))])
  pred = np.clip(np.round(imgs.mean(axis=(1, 2, 3)) / scale), 0, 9)
  return float(np.mean(pred == labels)), len(labels)


def test_accuracy_over_a_split_not_divisible_by_the_batch():
  mesh = parallel.make_mesh({"data": -1})
  task = _Task(Reader({}), mesh)
  ev = classification.Evaluator(Reader({"batch_size": 64}, "config.evals.acc"),
                                base.EvalView(task), mesh)
  for scale in (6.0, 9.0):
    want, n = _numpy_accuracy(scale)
    assert n % 64 and 0.05 < want < 0.95  # a partial last batch; a non-trivial accuracy
    out = ev.run({"scale": jnp.float32(scale)})
    assert out["accuracy"] == want and out["error"] == 1 - want
    preds, labels = ev.predictions({"scale": jnp.float32(scale)}, None)
    assert len(preds) == len(labels) == n
