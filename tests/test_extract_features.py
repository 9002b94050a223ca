"""The feature-extraction tool (``bigvl.tools.extract_features``): the ``.npz`` files hold the
checkpoint's (not a fresh model's) L2-normalised image embeddings in dataset order, the labels
of the configured label key, and the zero-shot class embeddings of the class names under the
templates, computed here independently with the model; ``python -m bigvl.lfa`` reads them."""

from __future__ import annotations

import os

import jax
import numpy as np

from bigvl import checkpoint, parallel, train
from bigvl.config import load_sibling
from bigvl.data import sources
from bigvl.data.builders import shapes_fewshot
from tests.helpers import REPO, tiny_config, tiny_overrides


def _l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_features_and_class_embeddings_are_the_checkpoints(shapes_data_dir, tmp_path):
  sources.tfds_builder("shapes_fewshot/shifted_small", shapes_data_dir)
  c = tiny_config(shapes_data_dir, seed=3, **{"mesh.data": 1})
  c.evals = {}
  run = train.build(c, devices=jax.devices()[:1])
  batch = parallel.global_batch(next(run.task.train_data(run.seed)), run.mesh)
  state = train.compile_run(run, batch).init(batch)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "two_tower"))
  ckpt.save(6, state, {})
  ckpt.close()
  params = parallel.to_host(train.model_params(state))

  tc = load_sibling(os.path.join(REPO, "configs", "x.py"), "lfa_shapes").get_config(
      f"tiny,two_tower={tmp_path / 'two_tower'}")
  flat = tiny_overrides(shapes_data_dir)
  for key in [k for k in flat if k.startswith("model.")]:
    parts = key.split(".")
    if len(parts) == 3:
      tc.model[parts[1]][parts[2]] = flat[key]
    else:
      tc.model[parts[1]] = flat[key]
  tc.update_from_flattened_dict({"input.dataset": "shapes_captions/small",
                                 "input.data_dir": shapes_data_dir, "mesh.data": 1,
                                 "extract.batch_size": 64})
  tool_run = train.build(tc, devices=jax.devices()[:1])
  tool_run.tool.run(tool_run, str(tmp_path / "w"))

  source, _ = sources.get_source("shapes_fewshot/shifted_small", "test", shapes_data_dir)
  with np.load(tmp_path / "w" / "features" / "test.npz", allow_pickle=False) as z:
    feats, labels, zcls = z["features"], z["labels"], z["class_embeddings"]
    names, templates = list(z["class_names"]), tuple(z["templates"])
  assert names == list(shapes_fewshot.OBJECT_NAMES) and templates == ("a {}", "a picture of a {}")
  assert feats.shape == (len(source), 32) and zcls.shape == (24, 32)
  np.testing.assert_array_equal(labels, [source[i]["object_label"] for i in range(len(source))])

  model, task = run.task.model, run.task
  images = np.stack([source[i]["image"] for i in range(8)]).astype(np.float32) / 127.5 - 1.0
  want = _l2(np.asarray(model.apply({"params": params}, images, method="embed_images")))
  np.testing.assert_allclose(feats[:8], want, atol=2e-5)
  tokens = task.encode_texts([t.format(n) for n in names for t in templates])["tokens"]
  z = _l2(np.asarray(model.apply({"params": params}, tokens, method="embed_texts")))
  want = _l2(z.reshape(24, 2, -1).mean(1))
  np.testing.assert_allclose(zcls, want, atol=2e-5)

  from bigvl import lfa

  out = tmp_path / "lfa.json"
  assert lfa.main(["--train", str(tmp_path / "w" / "features" / "train.npz"), "--test",
                   str(tmp_path / "w" / "features" / "test.npz"), "--shots", "1", "--seeds",
                   "0", "--linear-probe", "--n-iters", "5", "--out", str(out)]) == 0
  assert out.exists()
