"""Test session set-up: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

# In the test processes XLA's backend runs at optimisation level 0: their programs are tiny and
# compiled once each, so compile time is most of their time (the in-process tests take ~40%
# less CPU). Subprocess runs (`python -m bigvl.main` in tests/helpers.py) have one device and
# compile at -O1 (as fast to run as the users' -O2 for these programs, ~30% sooner compiled);
# the README demo runs with the users' flags.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One XLA compilation cache for the whole run: the controller makes it before the xdist
# workers start, and they and every `python -m bigvl.main` they spawn inherit it, so a program
# compiled once (the tiny SigLIP step that a dozen subprocess runs share) is loaded after.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bigvl-tests-xla-")
  os.environ["BIGVL_TESTS_OWN_XLA_CACHE"] = "1"
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The pytest-xdist workers and every process a test starts inherit the glibc tunables of the
# retained host heap a CPU run gets (bigvl/heap.py): no test step faults its scratch in
# afresh, and a `python -m bigvl.main` child finds them set and does not re-execute itself.
from bigvl import heap as _heap  # noqa: E402

if _heap.resolve("auto") == "retain":
  os.environ.update(_heap.retain_environ(dict(os.environ)) or {})

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

#: The longest single test (the README demo, ~200 s): its file goes first of all.
LONGEST_FILE = "test_demo.py"


def pytest_collection_modifyitems(config, items):
  """The demo's file, then the other files that hold end-to-end (``slow``) tests run first:
  the workers take a file at a time in this order, so the long ones start early instead of
  finishing alone at the end."""
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  # stable sort: each file's tests stay contiguous and in order
  items.sort(key=lambda item: (item.path.name != LONGEST_FILE, item.path not in slow_files))


def pytest_sessionfinish(session, exitstatus):
  """The controller removes the run's compilation cache (workers leave it)."""
  if os.environ.get("BIGVL_TESTS_OWN_XLA_CACHE") and not hasattr(session.config, "workerinput"):
    import shutil

    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@contextlib.contextmanager
def built_once(request, tmp_path_factory, name: str):
  """A directory for the session resource ``name``, shared by the run's pytest-xdist workers:
  yields ``(path, ready)``; when ``ready`` is False the caller builds it (holding a lock the
  other workers wait on) and the directory is marked ready when the block ends."""
  worker = getattr(request.config, "workerinput", None)
  if worker is None:  # one process: a plain session directory
    yield pathlib.Path(tmp_path_factory.mktemp(name)), False
    return
  root = tmp_path_factory.getbasetemp().parent / f"shared-{worker['testrunuid']}"
  root.mkdir(exist_ok=True)
  path, marker = root / name, root / f"{name}.ready"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      ready = marker.exists()
      path.mkdir(exist_ok=True)
      yield path, ready
      marker.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _tfds_dir(request, tmp_path_factory, name: str, *builders: str) -> str:
  with built_once(request, tmp_path_factory, name) as (root, ready):
    if not ready:
      from bigvl.data import sources

      for b in builders:
        sources.tfds_builder(b, str(root))
  return str(root)


@pytest.fixture(scope="session")
def shapes_data_dir(request, tmp_path_factory):
  """A data dir with ``shapes_captions/small`` prepared once for the whole session."""
  return _tfds_dir(request, tmp_path_factory, "tfds", "shapes_captions/small")


@pytest.fixture(scope="session")
def seg_data_dir(request, tmp_path_factory):
  """A data dir with ``shapes_segmentation/small`` prepared once for the whole session."""
  return _tfds_dir(request, tmp_path_factory, "tfds_seg", "shapes_segmentation/small")


@pytest.fixture(scope="session")
def fewshot_data_dir(request, tmp_path_factory):
  """A data dir with ``shapes_fewshot/small`` and ``shapes_fewshot/shifted_small`` prepared
  once for the whole session."""
  return _tfds_dir(request, tmp_path_factory, "tfds_fewshot", "shapes_fewshot/small",
                   "shapes_fewshot/shifted_small")


@pytest.fixture(scope="session")
def tiny_captioner(request, shapes_data_dir, tmp_path_factory):
  """``configs/lvlm_shapes.py:tiny`` trained once on ``shapes_captions/small`` (the LVLM
  family's shared checkpoint): ``(workdir, results)``. The method issues start from it."""
  import json

  from tests.helpers import run_main

  with built_once(request, tmp_path_factory, "tiny_captioner") as (workdir, ready):
    if not ready:
      res = run_main(["--config", "configs/lvlm_shapes.py:tiny", "--workdir", str(workdir),
                      f"--config.input.data_dir={shapes_data_dir}",
                      "--config.input.dataset=shapes_captions/small",
                      "--config.total_steps=400", "--config.log_every=100",
                      "--config.evals.captions.num_examples=128"], timeout=900)
      assert res.returncode == 0, res.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    return str(workdir), json.load(f)
