"""The README's demo, end to end: ``configs/siglip_shapes.py:tiny`` on a fresh data dir (the
dataset is built, the tokenizer trained) reaches zero-shot accuracy and R@1 far above chance."""

import json

import pytest

from tests.helpers import run_main


@pytest.mark.slow
def test_siglip_tiny_demo_beats_chance(tmp_path):
  out = run_main(["--config", "configs/siglip_shapes.py:tiny", "--workdir",
                  str(tmp_path / "w")], env_extra={"BIGVL_DATA": str(tmp_path / "data")},
                 timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "ex/s" in out.stdout and "ETA" in out.stdout  # the progress line
  res = json.loads((tmp_path / "w" / "results.json").read_text())
  print(res)
  assert res["zeroshot/accuracy"] > 3 * res["zeroshot/chance"]
  for d in ("i2t", "t2i"):
    assert res[f"retrieval/{d}_R@1"] > 3 * res["retrieval/chance_R@1"]
  assert (tmp_path / "data" / "shapes_captions" / "tokenizer_word4096.json").exists()
  assert list((tmp_path / "w" / "tb").glob("events.out.tfevents.*"))
