"""Domain adaptation (``bigvl.tasks.domain_adapt``) on the embedded digits: target labels never
reach training, the source-only baseline never sees a target image, every method takes a
sharded step equal to the 1-device step, and TC and CLIV switch on their terms. The tiny
config's end-to-end run is docs/domain_adaptation.md's runnable block
(tests/test_docs_commands_label_efficient.py checks both accuracies)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from bigvl import train
from bigvl.config import ConfigError, load_sibling
from tests.helpers import REPO, one_step


def da_config(arg: str = "tiny", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "da_digits").get_config(arg)
  c.update_from_flattened_dict({"input.batch_size": 16, "input.num_threads": 1,
                                "total_steps": 20, "model.width": 8, "da.disc_hidden": 16,
                                **overrides})
  c.evals = {}
  return c


def test_target_stream_carries_no_labels():
  run = train.build(da_config("tc_cliv,tiny"), devices=jax.devices()[:1])
  batch = next(run.task.train_data(0))
  assert set(batch["target"]) == {"image"} and set(batch["source"]) == {"image", "label"}
  assert batch["target"]["image"].shape == (16, 2, 16, 16, 1)  # weak + strong views, resized


def test_source_only_ignores_the_target_batch():
  run, batch, state, _, _ = one_step(da_config("method=source_only,tiny",
                                               **{"mesh.data": 1}), jax.devices()[:1])
  params = train.model_params(state)
  other = {**batch, "target": {"image": 255 - batch["target"]["image"]}}
  loss = jax.jit(lambda b: run.task.loss(params, state["extra"], b, jax.random.key(0), 0)[0])
  l1, l2 = loss(batch), loss(other)
  assert float(l1) == float(l2)
  cdan = train.build(da_config(**{"mesh.data": 1}), devices=jax.devices()[:1])
  assert cdan.task.examples_per_step == 32 and run.task.examples_per_step == 16


@pytest.mark.parametrize("arg", ["method=dann,tiny", "method=cdan_e,tc_cliv,tiny",
                                 "method=cdan,cliv,tiny"])
def test_sharded_step_equals_single_device(arg):
  """8 data shards against 1 device: batch norm over the global batch, the discriminator's
  dropout and the VAT direction from the same keys -> the same loss and update."""
  cfg = {"optim.name": "sgd", "optim.lr": 0.1, "optim.wd": 0.0, "da.disc_dropout": 0.0}
  _, _, _, a1, x1 = one_step(da_config(arg, **cfg, **{"mesh.data": 1}), jax.devices()[:1])
  run, _, _, a8, x8 = one_step(da_config(arg, **cfg))
  assert dict(run.mesh.shape)["data"] == 8
  for key in ("loss", "cls_loss", "adv_loss"):
    if key in x1:
      np.testing.assert_allclose(x8[key], x1[key], rtol=1e-4)
  assert x1["adv_loss"] > 0.1 and np.isfinite(x1["loss"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
               a1["params"], a8["params"])


def test_tc_and_cliv_terms_switch_on():
  _, _, _, _, aux = one_step(da_config("tc_cliv,tiny", **{"mesh.data": 1}),
                             jax.devices()[:1])
  assert {"tc_loss", "cliv_loss", "tc_mask", "cliv_mask"} <= set(aux)
  assert aux["tc_loss"] > 0  # a random network is not invariant to VAT's direction
  _, _, _, _, aux = one_step(da_config(**{"mesh.data": 1}), jax.devices()[:1])
  assert "tc_loss" not in aux and "cliv_loss" not in aux


def test_bad_da_configs():
  one = jax.devices()[:1]
  c = da_config(**{"mesh.data": 1})
  c.da.nonsense = 1.0
  with pytest.raises(ConfigError, match="not a knob"):
    train.build(c, devices=one)
  with pytest.raises(ConfigError, match="config.method"):
    train.build(da_config("method=mmd,tiny", **{"mesh.data": 1}), devices=one)
  with pytest.raises(ConfigError, match="cliv_threshold"):
    train.build(da_config(**{"mesh.data": 1, "da.cliv_threshold": 1.5}), devices=one)
