"""configs/clip_shapes.py runs the softmax (InfoNCE) loss through the same loop."""

import json
import math

from bigvl import train
from tests.helpers import tiny_config


def test_clip_config_trains_with_softmax_loss(shapes_data_dir, tmp_path):
  c = tiny_config(shapes_data_dir, "clip_shapes", total_steps=4, log_every=1)
  assert c.loss.name == "softmax"
  train.train(c, str(tmp_path))
  rows = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if "loss" in r]
  # At init the embeddings are nearly uninformative: CE ~ log(batch) = log 16.
  assert abs(losses[0] - math.log(16)) < 0.5
  assert all(r["b"] == 0.0 for r in rows if "b" in r)  # no bias in CLIP
  assert "zeroshot/accuracy" in json.load(open(tmp_path / "results.json"))
