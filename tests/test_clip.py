"""configs/clip_shapes.py runs the softmax (InfoNCE) loss through the same loop, and learns."""

import json
import math

import numpy as np
import pytest

from bigvl import train
from tests.helpers import tiny_config


@pytest.mark.slow
def test_clip_config_trains_with_softmax_loss(shapes_data_dir, tmp_path):
  c = tiny_config(shapes_data_dir, "clip_shapes", total_steps=40, log_every=1)
  assert c.loss.name == "softmax"
  train.train(c, str(tmp_path))
  rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert len(losses) == 40 and all(np.isfinite(losses))
  # At init the embeddings are nearly uninformative: CE ~ log(batch) = log 16 = 2.77.
  assert abs(losses[0] - math.log(16)) < 0.5
  # 40 steps of batch 16 take it to ~1.9-2.0 (the first five average ~2.9): a loss that does
  # not reach the parameters, or an optimizer that does not step, stays near log 16.
  first, last = np.mean(losses[:5]), np.mean(losses[-5:])
  assert last < first - 0.4 and last < math.log(16) - 0.5, losses
  assert all(r["b"] == 0.0 for r in rows if "b" in r)  # no bias in CLIP
  res = json.load(open(tmp_path / "results.json"))
  assert res["zeroshot/accuracy"] > res["zeroshot/chance"]
