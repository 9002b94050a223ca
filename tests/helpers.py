"""Shared test fixtures' building blocks: a tiny two-tower config on ``shapes_captions/small``."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir: str, **overrides):
  """configs/siglip_shapes.py:tiny shrunk to seconds: small dataset, width 32, 1 block."""
  from bigvl.config import load_sibling

  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "siglip_shapes").get_config("tiny")
  c.input.dataset = "shapes_captions/small"
  c.input.data_dir = data_dir
  c.input.batch_size = 16
  c.input.num_threads = 1
  c.total_steps = 6
  c.log_every = 2
  c.ckpt_every = 3
  c.schedule.warmup_steps = 2
  for tower in ("image", "text"):
    c.model[tower].update(width=32, depth=1, num_heads=2, mlp_dim=64)
  c.model.embed_dim = 32
  c.evals.zeroshot.batch_size = 64
  c.evals.retrieval.batch_size = 64
  c.update_from_flattened_dict(overrides)
  return c


def run_main(args: list[str], env_extra: dict | None = None, timeout: int = 600
             ) -> subprocess.CompletedProcess:
  """``python -m bigvl.main ARGS`` in a fresh process (1 CPU device unless XLA_FLAGS says)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "bigvl.main", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
