"""Data sources by name: the ``embedded:`` registry, and quiet TFDS preparation."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bigvl.config import ConfigError
from bigvl.data import digits, sources
from tests.helpers import REPO


class _Rows:
  def __init__(self, split):
    self.split = split

  def __len__(self):
    return 3

  def __getitem__(self, i):
    return {"x": i, "split": self.split}


def test_embedded_registry_serves_any_registered_dataset(monkeypatch):
  monkeypatch.setattr(sources, "_EMBEDDED", dict(sources._EMBEDDED))
  sources.register_embedded("rows", _Rows, splits=("train", "test"))
  src, info = sources.get_source("embedded:rows", "test")
  assert info is None and len(src) == 3 and src[2] == {"x": 2, "split": "test"}
  assert "rows" in sources.embedded_names()
  with pytest.raises(ConfigError, match="has no split 'val'; splits: train, test"):
    sources.get_source("embedded:rows", "val")


def test_embedded_digits_are_registered_by_their_module():
  assert set(digits.NAMES) <= set(sources.embedded_names())
  src, _ = sources.get_source("embedded:digits8x8", "test")
  want = digits.load_split("digits8x8", "test")
  np.testing.assert_array_equal(np.stack([src[i]["image"] for i in range(len(src))]),
                                want.images)
  with pytest.raises(ConfigError, match="unknown dataset 'embedded:nope'; embedded datasets: "
                                        "digits8x8, mnist5k"):
    sources.get_source("embedded:nope", "train")


def test_preparing_a_dataset_prints_one_line_and_nothing_from_tf_or_tfds(tmp_path):
  # A fresh process that, like bigvl.main, imports jax first (then TF_CPP_MIN_LOG_LEVEL alone
  # does not silence TF's start-up lines) and keeps python's absl logger to errors.
  code = ("import logging; logging.getLogger('absl').setLevel(logging.ERROR); import jax; "
          "from bigvl.data import sources; "
          f"sources.tfds_builder('shapes_captions/small', {str(tmp_path)!r})")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  from bigvl.data.builders.shapes_captions import ShapesCaptions

  assert out.stdout == (f"bigvl: preparing shapes_captions/small/{ShapesCaptions.VERSION} "
                        f"under {tmp_path} (once)\n")
  assert out.stderr == ""
