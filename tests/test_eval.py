"""bigvl.eval on a seconds-long SigLIP run: the loaded checkpoint's evaluation equals the train
loop's own evaluation of it, ``--step`` picks an older checkpoint, the figures are drawn and
saved, and a workdir with nothing to evaluate is a one-line config error (exit 2)."""

import json

import jax
import numpy as np
import pytest

import bigvl.eval
from bigvl import train
from bigvl.config import ConfigError
from tests.helpers import REPO, run_main, tiny_config, tiny_flags


@pytest.fixture(scope="module")
def trained(shapes_data_dir, tmp_path_factory):
  """6 steps, checkpoints at 3 and 6, evaluators at the end: ``(config, workdir, results)``."""
  workdir = str(tmp_path_factory.mktemp("eval_run"))
  config = tiny_config(shapes_data_dir)
  results = train.train(config, workdir)
  return config, workdir, results


def test_evaluation_of_the_checkpoint_equals_the_loops(trained, tmp_path):
  config, workdir, results = trained
  loaded = bigvl.eval.load(config, workdir)
  assert loaded.step == 6 and loaded.evaluator_names == ["compositionality", "retrieval",
                                                         "zeroshot"]
  got = bigvl.eval.evaluate(loaded, verbose=False)
  assert got.keys() == results.keys()
  for k, v in results.items():
    assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
  out = bigvl.eval.write(loaded, str(tmp_path), names=["zeroshot", "retrieval"])
  assert sorted(out["figures"]) == ["retrieval/gallery", "retrieval/similarity",
                                    "training_curves", "zeroshot/confusion"]
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["step"] == 6 and not any(k.startswith("compositionality") for k in saved)
  assert saved["zeroshot/accuracy"] == pytest.approx(results["zeroshot/accuracy"])
  for path in out["figures"].values():
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ConfigError, match="no evaluator named nope"):
    bigvl.eval.evaluate(loaded, names=["nope"])


def test_step_picks_that_checkpoint(trained):
  config, workdir, _ = trained
  old, new = bigvl.eval.load(config, workdir, step=3), bigvl.eval.load(config, workdir)
  assert (old.step, int(old.state["step"])) == (3, 3)
  a, b = jax.tree.leaves(old.params), jax.tree.leaves(new.params)
  assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))
  with pytest.raises(ConfigError, match="--step 4: .* holds steps 3, 6"):
    bigvl.eval.load(config, workdir, step=4)


def test_nothing_to_evaluate_is_a_config_error(shapes_data_dir, tmp_path):
  res = run_main(["--config", f"{REPO}/configs/siglip_shapes.py:tiny", "--workdir",
                  str(tmp_path / "empty"), *tiny_flags(shapes_data_dir)],
                 module="bigvl.eval", timeout=300)
  assert res.returncode == 2
  lines = res.stderr.strip().splitlines()
  assert lines[-1].startswith("bigvl: bad config: ") and "holds no checkpoint" in lines[-1]
  assert "Traceback" not in res.stderr
