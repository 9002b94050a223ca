"""Cross-Consistency Training (``bigvl.tasks.cct``) on ``shapes_segmentation/small``: the
labeled subset and the unlabeled stream are disjoint, the supervised baseline reads no
unlabeled image, the sharded step equals the 1-device step with every perturbation on, the
weak-label pseudo-labels never take an absent class, and the pixel CE skips ignored pixels.
The tiny config's end-to-end run is docs/segmentation.md's runnable block
(tests/test_docs_commands_label_efficient.py checks its mIoU and overlays)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import train
from bigvl.config import ConfigError, load_sibling
from bigvl.tasks import cct
from tests.helpers import REPO, one_step


def cct_config(data_dir, arg="tiny", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "cct_shapes").get_config(arg)
  c.update_from_flattened_dict({
      "input.dataset": "shapes_segmentation/small", "input.data_dir": data_dir,
      "input.num_labels": 24, "input.batch_size": 8, "total_steps": 10, "model.width": 8,
      "model.psp_features": 16, **overrides})
  if "unlabeled_batch_size" in c.input:
    c.input.unlabeled_batch_size = c.input.batch_size
  c.evals = {}
  return c


def test_labeled_and_unlabeled_images_are_disjoint(seg_data_dir):
  run = train.build(cct_config(seg_data_dir), devices=jax.devices()[:1])
  task = run.task
  assert len(task.labeled) == 24 and len(task.unlabeled) == 256 - 24
  assert not set(task.labeled.indices) & set(task.unlabeled.indices)
  batch = next(task.train_data(0))
  assert set(batch["labeled"]) == {"image", "mask"} and set(batch["unlabeled"]) == {"image"}
  assert batch["labeled"]["mask"].shape == (8, 32, 32, 1)
  assert task.aux_kinds == tuple(cct.P.KINDS)  # tiny: one decoder per perturbation
  sup = train.build(cct_config(seg_data_dir, "tiny,supervised"), devices=jax.devices()[:1])
  assert sup.task.unlabeled is None and set(next(sup.task.train_data(0))) == {"labeled"}
  assert sup.task.examples_per_step == 8 and task.examples_per_step == 16


def test_sharded_step_equals_single_device(seg_data_dir):
  """8 data shards against 1 device, the perturbations that are not elementwise (random ones
  from the same keys): the same loss terms and the same update."""
  # xi = 1e-6 (the official finite-difference step) makes the float32 power iteration a
  # direction of rounding noise, different under any other reduction order; 0.1 is stable
  cfg = {"optim.name": "sgd", "optim.lr": 0.05, "optim.wd": 0.0, "cct.vat_xi": 0.1}
  # the perturbations with cross-position or cross-example work (the others are elementwise)
  kinds = ("vat", "cutout", "feature_drop", "dropout")
  arg = "tiny,aux=" + "+".join(kinds)
  _, _, _, a1, x1 = one_step(cct_config(seg_data_dir, arg, **cfg, **{"mesh.data": 1}),
                             jax.devices()[:1])
  run, _, _, a8, x8 = one_step(cct_config(seg_data_dir, arg, **cfg))
  assert dict(run.mesh.shape)["data"] == 8
  for key in ("loss", "sup_loss", "unsup_loss", *(f"unsup/{k}" for k in kinds)):
    np.testing.assert_allclose(x8[key], x1[key], rtol=5e-4, atol=1e-6, err_msg=key)
  assert x1["unsup_loss"] > 0 and np.isfinite(x1["loss"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               a1["params"], a8["params"])


def test_masked_pixel_ce_skips_ignored_pixels():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 5, 3))
  labels = rng.integers(0, 3, size=(2, 4, 5))
  labels[0, :2] = 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = labels != 255
  want = -np.mean(np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0]
                  [valid])
  got = cct.masked_pixel_ce(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), 255)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(cct.masked_pixel_ce(jnp.zeros((1, 2, 2, 3)), jnp.full((1, 2, 2), 255), 255)) == 0


def test_weak_pseudo_labels_take_only_background_or_present_classes(seg_data_dir):
  run = train.build(cct_config(seg_data_dir, **{"cct.weak_weight": 0.4,
                                                "cct.weak_threshold": 0.0}),
                    devices=jax.devices()[:1])
  batch = next(run.task.train_data(0))
  weak = batch["unlabeled"]["weak"]
  assert weak.shape == (8, 4) and set(np.unique(weak)) <= {0.0, 1.0} and weak.sum() > 0
  logits = jax.random.normal(jax.random.key(0), (8, 6, 6, 5)) * 3
  labels = np.asarray(run.task._weak_targets(logits, jnp.asarray(weak)))
  for b in range(8):
    allowed = {0} | {int(c) + 1 for c in np.flatnonzero(weak[b])}
    assert set(np.unique(labels[b])) <= allowed
  strict = cct.Task.__new__(cct.Task)
  strict.k, strict.ignore_label = {"weak_threshold": 0.999}, 255
  strict_labels = np.asarray(strict._weak_targets(logits, jnp.asarray(weak)))
  kept = strict_labels != 255
  assert 0 < kept.sum() < kept.size and np.all(strict_labels[kept] == labels[kept])


@pytest.mark.parametrize("bad,match", [
    ({"cct.aux.vat": -1}, "aux.vat must be an int >= 0"),
    ({"cct.rampup_fraction": 2.0}, "rampup_fraction"),
    ({"input.num_labels": 10_000}, "num_labels"),
    ({"input.ignore_label": 3}, "is a class id")])
def test_config_errors(seg_data_dir, bad, match):
  with pytest.raises(ConfigError, match=match):
    train.build(cct_config(seg_data_dir, **bad), devices=jax.devices()[:1])
