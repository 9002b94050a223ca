"""Shared test fixtures' building blocks: a tiny two-tower config on ``shapes_captions/small``."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_overrides(data_dir: str) -> dict:
  """configs/siglip_shapes.py:tiny shrunk to seconds: small dataset, width 32, 1 block."""
  out = {"input.dataset": "shapes_captions/small", "input.data_dir": data_dir,
         "input.batch_size": 16, "input.num_threads": 1, "total_steps": 6, "log_every": 2,
         "ckpt_every": 3, "schedule.warmup_steps": 2, "model.embed_dim": 32,
         "evals.zeroshot.batch_size": 64, "evals.retrieval.batch_size": 64}
  for tower in ("image", "text"):
    out.update({f"model.{tower}.width": 32, f"model.{tower}.depth": 1,
                f"model.{tower}.num_heads": 2, f"model.{tower}.mlp_dim": 64})
  return out


def tiny_config(data_dir: str, config: str = "siglip_shapes", arg: str = "tiny", **overrides):
  """``configs/<config>.py:<arg>`` with :func:`tiny_overrides` and more overrides."""
  from bigvl.config import load_sibling

  c = load_sibling(os.path.join(REPO, "configs", "x.py"), config).get_config(arg)
  flat = tiny_overrides(data_dir)
  for key in [k for k in flat if k.startswith("model.image.") or k.startswith("model.text.")]:
    tower, field = key.split(".")[1:]
    c.model[tower][field] = flat.pop(key)
  c.update_from_flattened_dict({**flat, **overrides})
  return c


def tiny_flags(data_dir: str, **overrides) -> list[str]:
  """The same as command-line overrides for ``python -m bigvl.main``."""
  return [f"--config.{k}={v}" for k, v in {**tiny_overrides(data_dir), **overrides}.items()]


#: XLA_FLAGS of the processes the tests start: XLA:CPU's LLVM backend at -O1 instead of the
#: default -O2. The tests' tiny programs then compile ~30% sooner (the tiny VladVA run's
#: programs: 26.8 -> 19.0 s) and run as fast (tiny SigLIP: 572 vs 577 ex/s); compile time is
#: most of a short run's. The README demo (tests/test_demo.py) runs with the users' defaults.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


def subprocess_env(env_extra: dict | None = None, user_xla: bool = False) -> dict:
  """This process's environment with :data:`TEST_XLA_FLAGS` (or, ``user_xla``, no XLA_FLAGS)
  in place of the test session's (8 devices, -O0), plus ``env_extra`` (it carries conftest's
  glibc tunables: a ``python -m bigvl.main`` child does not re-execute itself to set them;
  tests/test_heap.py runs that path)."""
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if not user_xla:
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
  env.update(env_extra or {})
  return env


def _main_cmd(args: list[str], env_extra: dict | None, module: str = "bigvl.main",
              user_xla: bool = False) -> dict:
  return {"args": [sys.executable, "-m", module, *args], "cwd": REPO,
          "env": subprocess_env(env_extra, user_xla)}


def run_main(args: list[str], env_extra: dict | None = None, timeout: int = 600,
             module: str = "bigvl.main", user_xla: bool = False) -> subprocess.CompletedProcess:
  """``python -m bigvl.main ARGS`` (or another ``module``) in a fresh process (1 CPU device
  unless XLA_FLAGS says; see :func:`subprocess_env`)."""
  return subprocess.run(**_main_cmd(args, env_extra, module, user_xla), capture_output=True,
                        text=True, timeout=timeout)


def start_main(args: list[str], stdout, stderr, env_extra: dict | None = None
               ) -> subprocess.Popen:
  """:func:`run_main` without waiting: the test watches, signals and reaps the process."""
  return subprocess.Popen(**_main_cmd(args, env_extra), stdout=stdout, stderr=stderr, text=True)


def grads_and_losses(run, fns, state, batch, data, steps: int = 3):
  """The whole-parameter gradient of ``run.task.loss`` on ``batch`` at ``state``, then the
  losses of ``steps`` train steps on the next batches of ``data``: what a sharded step is
  compared by against the 1-device step. Returns ``(host gradients, losses, final state)``."""
  import jax

  from bigvl import parallel, train

  grads = jax.jit(jax.grad(lambda p: run.task.loss(
      p, state["extra"], batch, state["rng"], 0)[0]))(train.model_params(state))
  grads = parallel.to_host(grads)
  losses = []
  for _ in range(steps):
    state, aux = fns.step(state, parallel.global_batch(next(data), run.mesh))
    losses.append(float(aux["loss"]))
  return grads, losses, state


def one_step(config, devices=None):
  """Builds ``config``, takes one train step on its first batch: ``(run, batch, state before
  (host), state after (host), step metrics)``."""
  import jax

  from bigvl import parallel, train

  run = train.build(config, devices=devices)
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  state = fns.init(batch)
  before = parallel.to_host(state)  # the step donates the state
  new, aux = fns.step(state, batch)
  return run, batch, before, parallel.to_host(new), jax.device_get(aux)
