"""Autoregressive unsupervised segmentation (``bigvl.tasks.ar_seg``): training reads no mask,
the two views use distinct orderings (one ordering: the same output twice), the sharded step
equals the 1-device step, and inference runs the unmasked network. The tiny config's
end-to-end run, with Hungarian-matched evaluation, is docs/segmentation.md's runnable block
(tests/test_docs_commands_label_efficient.py checks its results and overlays)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from bigvl import train
from bigvl.config import ConfigError, load_sibling
from bigvl.tasks import ar_seg
from tests.helpers import REPO, one_step


def ar_config(data_dir, arg="tiny", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "arseg_shapes").get_config(arg)
  c.update_from_flattened_dict({
      "input.dataset": "shapes_segmentation/small", "input.data_dir": data_dir,
      "input.batch_size": 8, "total_steps": 10, "model.width": 8,
      "model.dilations": (1, 2, 1), "model.feature_dim": 8, **overrides})
  c.evals = {}
  return c


def test_training_reads_no_mask_and_pairs_are_distinct_orderings(seg_data_dir):
  run = train.build(ar_config(seg_data_dir), devices=jax.devices()[:1])
  batch = next(run.task.train_data(0))
  assert set(batch) == {"image"} and batch["image"].shape == (8, 32, 32, 3)
  pairs = ar_seg.ordering_pairs(tuple(range(8)))
  assert len(pairs) == 56 and np.all(pairs[:, 0] != pairs[:, 1])
  assert ar_seg.ordering_pairs((3,)).tolist() == [[3, 3]]
  params, state, _ = _init(run, batch)
  views = jax.jit(jax.vmap(lambda r: run.task.loss(params, state, batch, r, 0)[1][0]))(
      jax.random.split(jax.random.key(0), 40))
  seen = set(zip(np.asarray(views["o1"]).tolist(), np.asarray(views["o2"]).tolist(),
                 strict=True))
  assert all(a != b for a, b in seen) and len(seen) > 20


def _init(run, batch):
  params, state = run.task.init(jax.random.key(0), batch)
  return params, state, batch


def test_single_ordering_ablation_compares_an_output_with_itself(seg_data_dir):
  run = train.build(ar_config(seg_data_dir, "tiny,single"), devices=jax.devices()[:1])
  batch = next(run.task.train_data(0))
  params, state, _ = _init(run, batch)
  loss, (m, _) = jax.jit(lambda p: run.task.loss(p, state, batch, jax.random.key(1), 0))(params)
  assert int(m["o1"]) == int(m["o2"]) == 0 and np.isfinite(float(loss))


def test_sharded_step_equals_single_device(seg_data_dir):
  """Both objectives (IIC's MI and the spatial InfoNCE), 8 data shards against 1 device."""
  cfg = {"optim.name": "sgd", "optim.lr": 0.1}
  _, _, _, a1, x1 = one_step(ar_config(seg_data_dir, "tiny,objective=both", **cfg,
                                       **{"mesh.data": 1}), jax.devices()[:1])
  run, _, _, a8, x8 = one_step(ar_config(seg_data_dir, "tiny,objective=both", **cfg))
  assert dict(run.mesh.shape)["data"] == 8
  for key in ("loss", "mi", "infonce"):
    np.testing.assert_allclose(x8[key], x1[key], rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=2e-3, atol=2e-5),
               a1["params"], a8["params"])


def test_inference_runs_the_unmasked_network(seg_data_dir):
  run = train.build(ar_config(seg_data_dir), devices=jax.devices()[:1])
  batch = next(run.task.train_data(0))
  params, state, _ = _init(run, batch)
  fns = run.task.predict_fns()
  x = run.task.normalize(batch["image"])
  variables = {"params": params, "batch_stats": state["batch_stats"]}
  np.testing.assert_allclose(
      np.asarray(fns["clusters"](params, state, batch)),
      np.asarray(run.task.model.apply(variables, x, None, train=False)["clusters"]), rtol=1e-6)
  masked = [jax.nn.softmax(run.task.model.apply(variables, x, o, train=False)["clusters"])
            for o in range(8)]
  np.testing.assert_allclose(np.exp(np.asarray(fns["clusters_ensemble"](params, state, batch))),
                             np.mean(masked, axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad,match", [({"ar.orderings": (0, 0)}, "distinct"),
                                       ({"ar.orderings": (9,)}, "distinct ints"),
                                       ({"ar.objective": "pixels"}, "objective"),
                                       ({"ar.max_shift": 40}, "max_shift")])
def test_config_errors(seg_data_dir, bad, match):
  with pytest.raises(ConfigError, match=match):
    train.build(ar_config(seg_data_dir, **bad), devices=jax.devices()[:1])


def test_photometric_jitter_is_a_per_image_colour_map():
  """The views differ only in colour: the jitter is one function of the colour per image
  (equal input colours -> equal output colours; geometry untouched), identity at strength 0,
  ``1 - x`` when always inverted, and different images get different maps."""
  rng = np.random.default_rng(0)
  palette = rng.uniform(0, 1, (4, 6, 3)).astype(np.float32)  # 6 colours per image
  idx = rng.integers(0, 6, (4, 10, 10))
  x = jax.numpy.asarray(palette[np.arange(4)[:, None, None], idx])  # [4, 10, 10, 3]
  out = np.asarray(ar_seg.photometric_jitter(x, jax.random.key(1), 1.0, 0.5))
  for b in range(4):
    for c in range(6):
      sel = out[b][idx[b] == c]
      np.testing.assert_allclose(sel, np.broadcast_to(sel[:1], sel.shape), atol=1e-6)
  assert not np.allclose(out[0], np.asarray(x[0]), atol=1e-2)
  np.testing.assert_allclose(np.asarray(ar_seg.photometric_jitter(x, jax.random.key(1), 0.0)),
                             np.asarray(x), atol=1e-6)
  np.testing.assert_allclose(
      np.asarray(ar_seg.photometric_jitter(x, jax.random.key(2), 0.0, invert=1.0)),
      1.0 - np.asarray(x), atol=1e-6)
