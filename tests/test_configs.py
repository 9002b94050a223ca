"""Every experiment config has the keys a user relies on, and its ``:tiny`` variant builds."""

import glob
import os

import pytest

from bigvl.config import ConfigError, load_sibling
from tests.helpers import REPO

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{REPO}/configs/*.py"))
REQUIRED = ("seed", "log_every", "ckpt_every", "mesh", "evals", "input.batch_size")


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_config_has_required_keys(name, arg):
  mod = load_sibling(f"{REPO}/configs/x.py", name)
  try:
    c = mod.get_config(arg)
  except ConfigError:
    pytest.skip(f"{name} has no {arg!r} variant")
  flat = c.to_dict()
  for key in REQUIRED:
    node = flat
    for part in key.split("."):
      assert part in node, f"{name}:{arg} lacks {key}"
      node = node[part]
  assert any(flat.get(k) for k in ("total_steps", "total_epochs", "total_examples")), name
  assert {"data", "fsdp", "tensor"} <= set(flat["mesh"])
