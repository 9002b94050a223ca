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
