"""Test session set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
  """A data dir with ``shapes_captions/small`` prepared once for the whole session."""
  root = str(tmp_path_factory.mktemp("tfds"))
  from bigvl.data import sources

  sources.tfds_builder("shapes_captions/small", root)
  return root


@pytest.fixture(scope="session")
def seg_data_dir(tmp_path_factory):
  """A data dir with ``shapes_segmentation/small`` prepared once for the whole session."""
  root = str(tmp_path_factory.mktemp("tfds_seg"))
  from bigvl.data import sources

  sources.tfds_builder("shapes_segmentation/small", root)
  return root


@pytest.fixture(scope="session")
def fewshot_data_dir(tmp_path_factory):
  """A data dir with ``shapes_fewshot/small`` and ``shapes_fewshot/shifted_small`` prepared
  once for the whole session."""
  root = str(tmp_path_factory.mktemp("tfds_fewshot"))
  from bigvl.data import sources

  sources.tfds_builder("shapes_fewshot/small", root)
  sources.tfds_builder("shapes_fewshot/shifted_small", root)
  return root


@pytest.fixture(scope="session")
def tiny_captioner(shapes_data_dir, tmp_path_factory):
  """``configs/lvlm_shapes.py:tiny`` trained once on ``shapes_captions/small`` (the LVLM
  family's shared checkpoint): ``(workdir, results)``. The method issues start from it."""
  import json

  from tests.helpers import run_main

  workdir = str(tmp_path_factory.mktemp("tiny_captioner"))
  res = run_main(["--config", "configs/lvlm_shapes.py:tiny", "--workdir", workdir,
                  f"--config.input.data_dir={shapes_data_dir}",
                  "--config.input.dataset=shapes_captions/small", "--config.total_steps=400",
                  "--config.log_every=100", "--config.evals.captions.num_examples=128"],
                 timeout=900)
  assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return workdir, json.load(f)
