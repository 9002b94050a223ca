"""bigvl's SigLIP train step against open_clip's, same model size, batch and machine.

  python bench/compare.py [--size s16] [--batch 32] [--dtypes float32,bfloat16] \\
      [--rounds 2] [--steps 5] [--warmup 2] [--json F] [--open_clip_heap system|retain]

The model is SigLIP's ViT-S/16 (``--size s16``) or ViT-B/16 (``b16``) pair of towers
(``configs/siglip_shapes.py:size=...``): a 224-px ViT with mean pooling and a 12-layer,
context-64 text transformer over a 32,000-token table, both projected to ``embed_dim =
width``, the sigmoid loss with ``t' = log 10``, ``b = -10``, AdamW (``b2`` 0.95, weight
decay 1e-4) after global-norm clipping at 1.0. open_clip (3.x, installed only for this
benchmark) builds the same shapes from its own ``CLIP`` class and ``SigLipLoss`` and trains
with ``torch.optim.AdamW``; its bf16 row is ``torch.autocast('cpu', bfloat16)`` (open_clip's
``--precision amp_bf16``), bigvl's is ``config.model.dtype=bfloat16`` (f32 parameters and
optimizer state in both).

bigvl's subprocess runs its step as ``python -m bigvl.main`` would: with
``config.runtime.host_heap`` (default ``auto``: on a CPU, glibc tunables that keep XLA's
per-step scratch memory mapped, :mod:`bigvl.heap`). open_clip's runs with the environment as
it is (``--open_clip_heap retain`` gives it the same tunables: docs/benchmarks.md has both).

Each measurement runs in its own subprocess (no allocator or thread-pool state carries over)
and the implementations alternate within each round, so a drift of the machine hits both.
A row is the median of ``--steps`` timed steps after ``--warmup``; the table gives per
implementation and dtype the median over rounds, and the ratio bigvl / open_clip of
examples/s per round. FLOPs per step are XLA's cost analysis of bigvl's step (the same
model) for both, so their GFLOP/s are comparable.

open_clip imports ``torchvision`` at import time; the registry's torchvision is a CUDA build
that cannot load beside the CPU torch, and open_clip's training path needs none of it, so a
name-only stand-in (:func:`install_torchvision_stub`) is registered first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("bigvl", "open_clip")


def install_torchvision_stub() -> None:
  """Registers a ``torchvision`` whose names open_clip imports exist but fail when used."""

  def placeholder(name: str) -> type:
    def fail(*_a, **_k):
      raise RuntimeError(f"torchvision.{name} is a stand-in (bench/compare.py)")
    return type(name, (), {"__init__": fail})

  mods = {n: types.ModuleType(n) for n in (
      "torchvision", "torchvision.transforms", "torchvision.transforms.functional",
      "torchvision.ops", "torchvision.ops.misc")}
  for n in ("Normalize", "Compose", "RandomResizedCrop", "ToTensor", "Resize", "CenterCrop",
            "ColorJitter", "Grayscale"):
    setattr(mods["torchvision.transforms"], n, placeholder(n))
  mods["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(
      BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest")
  mods["torchvision.transforms"].functional = mods["torchvision.transforms.functional"]
  mods["torchvision.ops.misc"].FrozenBatchNorm2d = placeholder("FrozenBatchNorm2d")
  mods["torchvision.ops"].misc = mods["torchvision.ops.misc"]
  mods["torchvision"].transforms, mods["torchvision"].ops = (mods["torchvision.transforms"],
                                                             mods["torchvision.ops"])
  mods["torchvision"].__version__ = "0.0-stub"
  import importlib.machinery

  for n, m in mods.items():  # find_spec() callers (transformers, timm) see a real spec
    m.__spec__ = importlib.machinery.ModuleSpec(n, None)
  sys.modules.update(mods)


def bigvl_config(size: str, batch: int, dtype: str) -> Any:
  from bigvl.config import load_config

  c = load_config(f"{REPO}/configs/siglip_shapes.py:size={size}")
  c.input.batch_size = batch
  c.model.dtype = dtype
  return c


def run_bigvl(size: str, batch: int, dtype: str, steps: int, warmup: int) -> dict[str, Any]:
  sys.path.insert(0, REPO)
  from bench import throughput
  from bigvl import heap

  config = bigvl_config(size, batch, dtype)
  heap.ensure(config.runtime.host_heap)  # as `python -m bigvl.main` runs (this is a subprocess)
  r = throughput.measure(config, steps=steps, warmup=warmup,
                         spec=f"configs/siglip_shapes.py:size={size}")
  return {k: r[k] for k in ("examples_per_s", "step_s", "step_s_all", "flops_per_device",
                            "compile_s", "max_rss_mb", "loss", "host_heap")}


def open_clip_model(size: str) -> Any:
  """open_clip's ``CLIP`` with the shapes of ``configs/siglip_shapes.py:size=<size>``."""
  from configs.siglip_shapes import SIZES

  install_torchvision_stub()
  import open_clip

  width, depth, heads = SIZES[size]
  vision = dict(image_size=224, patch_size=16, width=width, layers=depth,
                head_width=width // heads, mlp_ratio=4.0, pool_type="avg", no_ln_pre=True,
                norm_kwargs={"eps": 1e-6})
  text = dict(context_length=64, vocab_size=32_000, width=width, heads=heads, layers=depth,
              no_causal_mask=True, pool_type="last", proj_bias=True, norm_kwargs={"eps": 1e-6})
  return open_clip.model.CLIP(embed_dim=width, vision_cfg=vision, text_cfg=text,
                              init_logit_scale=2.302585, init_logit_bias=-10.0,
                              output_dict=True)


def run_open_clip(size: str, batch: int, dtype: str, steps: int,
                  warmup: int) -> dict[str, Any]:
  import contextlib
  import resource

  import torch

  sys.path.insert(0, REPO)
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  model = open_clip_model(size)
  model.train()
  from open_clip.loss import SigLipLoss

  loss_fn = SigLipLoss()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=1e-4)
  images = torch.randn(batch, 3, 224, 224)
  tokens = torch.randint(1, 32_000, (batch, 64))
  cast = (torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16"
          else contextlib.nullcontext())
  times, loss = [], None
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    with cast:
      out = model(images, tokens)
      loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                     out["logit_bias"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return {"examples_per_s": batch / step_s, "step_s": step_s, "step_s_all": times,
          "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "loss": float(loss), "torch": torch.__version__,
          "open_clip": sys.modules["open_clip"].__version__}


def one(impl: str, size: str, batch: int, dtype: str, steps: int, warmup: int,
        retain_heap: bool = False) -> dict:
  """One measurement in a fresh subprocess (its last stdout line is the JSON result);
  ``retain_heap``: the subprocess starts under :mod:`bigvl.heap`'s glibc tunables."""
  cmd = [sys.executable, os.path.abspath(__file__), "--_one", impl, "--size", size,
         "--batch", str(batch), "--dtypes", dtype, "--steps", str(steps),
         "--warmup", str(warmup)]
  env = dict(os.environ)
  if retain_heap:
    sys.path.insert(0, REPO)
    from bigvl import heap

    env = heap.retain_environ(env) or env
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False, env=env)
  if out.returncode:
    raise RuntimeError(f"{impl} {dtype} failed:\n{out.stderr[-3000:]}")
  r = json.loads(out.stdout.strip().splitlines()[-1])
  r.update(impl=impl, dtype=dtype)
  return r


def table(results: list[dict], batch: int, size: str) -> str:
  """Markdown: per (dtype, impl) the median examples/s over rounds, GFLOP/s, and the
  per-round ratios bigvl / open_clip."""
  flops = {r["dtype"]: r["flops_per_device"] for r in results if r.get("flops_per_device")}
  lines = [f"SigLIP {size.upper()} train step, batch {batch}, {os.cpu_count()} CPU threads",
           "", "| dtype | implementation | examples/s (median of rounds) | step ms | "
           "GFLOP/s | rounds |", "|---|---|---:|---:|---:|---|"]
  for dtype in dict.fromkeys(r["dtype"] for r in results):
    for impl in IMPLS:
      rs = [r for r in results if r["dtype"] == dtype and r["impl"] == impl]
      if not rs:
        continue
      eps = statistics.median(r["examples_per_s"] for r in rs)
      gf = flops.get(dtype) or flops.get("float32")
      gfs = f"{gf * eps / batch / 1e9:.0f}" if gf else "?"
      each = ", ".join(f"{r['examples_per_s']:.2f}" for r in rs)
      lines.append(f"| {dtype} | {impl} | {eps:.2f} | {1e3 * batch / eps:.0f} | {gfs} | "
                   f"{each} |")
  lines.append("")
  for dtype in dict.fromkeys(r["dtype"] for r in results):
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
      if r["dtype"] == dtype:
        by_round.setdefault(r["round"], {})[r["impl"]] = r["examples_per_s"]
    ratios = [v["bigvl"] / v["open_clip"] for v in by_round.values() if len(v) == 2]
    if ratios:
      lines.append(f"{dtype}: bigvl / open_clip = {statistics.median(ratios):.2f} "
                   f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="s16", choices=("s16", "b16"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--json", default=None, help="append every measurement here (JSON lines)")
  p.add_argument("--open_clip_heap", default="system", choices=("system", "retain"),
                 help="retain: open_clip runs under bigvl.heap's glibc tunables too")
  p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a._one:
    fn = run_bigvl if a._one == "bigvl" else run_open_clip
    print(json.dumps(fn(a.size, a.batch, a.dtypes, a.steps, a.warmup)), flush=True)
    return []
  results = []
  impls = a.impls.split(",")
  for rnd in range(a.rounds):
    for dtype in a.dtypes.split(","):
      order = impls if rnd % 2 == 0 else impls[::-1]  # alternate who goes first
      for impl in order:
        r = one(impl, a.size, a.batch, dtype, a.steps, a.warmup,
                retain_heap=impl == "open_clip" and a.open_clip_heap == "retain")
        r["round"] = rnd
        results.append(r)
        print(f"round {rnd} {impl:9s} {dtype:8s} {r['examples_per_s']:.2f} ex/s "
              f"(step {1e3 * r['step_s']:.0f} ms)", flush=True)
        if a.json:
          with open(a.json, "a") as f:
            f.write(json.dumps(r) + "\n")
  print(table(results, a.batch, a.size), flush=True)
  return results


if __name__ == "__main__":
  main()
