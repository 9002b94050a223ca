"""Greedy decode throughput: bigvl ``generate`` vs transformers ``generate`` on CPU.

Usage: ``python bench/decode_throughput.py [--reps 3] [--batches 1 16]`` (results in
``docs/results/decode_throughput.md``).

One random ~100M-parameter Llama-shaped model (vocab 32000, hidden 768, 12 layers, 12 heads,
4 kv heads, head dim 64, intermediate 2048, tied embeddings, float32) is built as a
transformers ``LlamaForCausalLM`` (torch CPU, seed 0), saved to safetensors in a temp dir and
imported with :func:`bigvl.convert.load_hf_checkpoint`: the same weights on both sides.
Per batch size: prompts of 128 random tokens, 128 new tokens, EOS an id outside the vocabulary
(neither side stops early, and transformers' ``min_new_tokens`` masks no real token).

* bigvl: one warm-up call (compiles prefill + decode; reported as compile time = first call
  minus the steady-state median), then ``--reps`` timed calls of
  :func:`bigvl.generate.generate`; then the two jitted programs of ``generate._PROGRAMS``
  timed separately (prefill, decode). Checks: :func:`bigvl.generate.compilations` stays
  constant over the timed calls, the KV cache is ``[layers, B, 256, kv_heads, head_dim]``, and
  the number of ``copy`` ops of cache-sized buffers in the decode program's HLO (2 = one per
  k/v in the entry computation, once per call, since the cache argument is not donated; a
  copy in the while body would be once per token).
* transformers: ``generate(do_sample=False, max_new_tokens=128, min_new_tokens=128)`` under
  ``torch.inference_mode()`` with its default (dynamic) KV cache, one warm-up, ``--reps``
  timed calls, interleaved with bigvl's (so both see the same background load). Both use
  all cores (``torch.set_num_threads(os.cpu_count())``; XLA's CPU
  client uses all cores by default).

Reports medians, new tokens/s (batch x 128 / wall time), the ratio bigvl / transformers, and
the fraction of identical greedy tokens.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import time

import numpy as np

SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
             num_attention_heads=12, num_key_value_heads=4, head_dim=64,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=True)
PROMPT_LEN = 128
NEW_TOKENS = 128
NO_EOS = 10**6  # outside the vocabulary


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _median_time(fn, reps: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def build_hf(directory: str):
  """The random transformers model (seed 0), saved to ``directory`` as safetensors."""
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(**SHAPE)
  model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32)
  model.eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


def hf_generate(model, prompts: np.ndarray) -> np.ndarray:
  import torch

  ids = torch.from_numpy(prompts.astype(np.int64))
  with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         eos_token_id=NO_EOS, pad_token_id=0, temperature=None, top_k=None,
                         top_p=None)
  return out[:, prompts.shape[1]:].numpy()


def cache_copies(hlo: str, cache_shape: tuple[int, ...]) -> int:
  """Number of ``copy`` instructions producing a cache-sized f32 buffer in HLO text."""
  dims = ",".join(str(d) for d in cache_shape)
  pat = re.compile(rf"= f32\[{dims}\]\S* copy\(")
  return sum(1 for line in hlo.splitlines() if pat.search(line))


def bench_batch(hf, model, params, batch: int, reps: int) -> dict:
  import jax

  from bigvl import generate as gen

  prompts = np.random.RandomState(batch).randint(3, SHAPE["vocab_size"],
                                                 (batch, PROMPT_LEN)).astype(np.int32)
  plist = prompts.tolist()
  run = lambda: gen.generate(model, params, plist, NEW_TOKENS, eos_id=None)

  t0 = time.perf_counter()
  ours = run()
  first_call = time.perf_counter() - t0
  n_compiled = gen.compilations()
  hf_run = lambda: hf_generate(hf, prompts)
  theirs = hf_run()  # warm-up
  # interleaved, so both sides see the same background load on a shared machine
  ours_times, hf_times = [], []
  for _ in range(reps):
    ours_times.append(_median_time(run, 1)[0])
    hf_times.append(_median_time(hf_run, 1)[0])
  ours_med, hf_med = statistics.median(ours_times), statistics.median(hf_times)
  assert gen.compilations() == n_compiled, "recompiled during the timed calls"

  # the two programs separately (the same jitted functions generate() calls)
  key = (model, NEW_TOKENS, (0.0, None, None), None, 0)
  pre, dec = gen._PROGRAMS[key]
  ids, mask = gen.left_pad(plist)
  variables = {"params": params}
  k1, k2 = jax.random.split(jax.random.key(0))
  state = {}

  def run_pre():
    state["out"] = jax.block_until_ready(pre(variables, ids, mask, k1, {}))

  def run_dec():
    first, cache, kv, pos = state["out"]
    jax.block_until_ready(dec(variables, cache, first, kv, pos, k2))

  run_pre()
  cache_shape = tuple(state["out"][1]["k"].shape)
  c = model.config
  assert cache_shape == (c.depth, batch, PROMPT_LEN + NEW_TOKENS, c.num_kv_heads, c.head_dim)
  pre_med, _ = _median_time(run_pre, reps)
  dec_med, _ = _median_time(run_dec, reps)
  assert gen.compilations() == n_compiled, "recompiled when calling the programs directly"
  first, cache, kv, pos = state["out"]
  hlo = dec.lower(variables, cache, first, kv, pos, k2).compile().as_text()
  copies = cache_copies(hlo, cache_shape)

  new = batch * NEW_TOKENS
  return dict(batch=batch, ours_med=ours_med, ours_times=ours_times, hf_med=hf_med,
              hf_times=hf_times, ours_tps=new / ours_med, hf_tps=new / hf_med,
              ratio=(new / ours_med) / (new / hf_med), compile=first_call - ours_med,
              pre=pre_med, dec=dec_med, dec_tok_ms=1e3 * dec_med / (NEW_TOKENS - 1),
              compilations=n_compiled, cache_shape=cache_shape, cache_copies=copies,
              agree=float(np.mean(ours == theirs)),
              rows_identical=int(np.sum(np.all(ours == theirs, axis=1))))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
  args = parser.parse_args()

  import jax
  import torch
  import transformers

  from bigvl.convert import load_hf_checkpoint

  torch.set_num_threads(os.cpu_count())
  with tempfile.TemporaryDirectory() as d:
    hf = build_hf(d)
    model, params = load_hf_checkpoint(d)
  n_params = sum(p.numel() for p in hf.parameters())
  assert n_params == model.config.num_params, (n_params, model.config.num_params)

  print(f"machine: nproc {os.cpu_count()}, {_cpu_model()}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (start)")
  print(f"python {platform.python_version()}, jax {jax.__version__} "
        f"({jax.devices()[0].platform}, {jax.device_count()} device), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  print(f"model: {SHAPE}, float32, {n_params:,} parameters")
  print(f"prompt {PROMPT_LEN}, new tokens {NEW_TOKENS}, median of {args.reps}")
  rows = [bench_batch(hf, model, params, b, args.reps) for b in args.batches]
  print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (end)")
  print()
  print("| batch | bigvl tok/s | transformers tok/s | bigvl / transformers | bigvl total s | "
        "transformers total s | bigvl prefill s | bigvl decode s (ms/token) | "
        "bigvl compile s | identical tokens |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['batch']} | {r['ours_tps']:.1f} | {r['hf_tps']:.1f} | {r['ratio']:.2f}x | "
          f"{r['ours_med']:.2f} | {r['hf_med']:.2f} | {r['pre']:.3f} | "
          f"{r['dec']:.2f} ({r['dec_tok_ms']:.1f}) | {r['compile']:.1f} | "
          f"{r['agree']:.1%} ({r['rows_identical']}/{r['batch']} rows) |")
  print()
  for r in rows:
    print(f"batch {r['batch']}: best bigvl / transformers tok/s "
          f"{r['batch'] * NEW_TOKENS / min(r['ours_times']):.1f} / "
          f"{r['batch'] * NEW_TOKENS / min(r['hf_times']):.1f}; "
          f"bigvl times {[round(t, 2) for t in r['ours_times']]}, "
          f"transformers times {[round(t, 2) for t in r['hf_times']]}; compiled programs "
          f"after warm-up {r['compilations']} (constant over the timed calls); KV cache "
          f"{r['cache_shape']}; cache-sized copies in the decode HLO: {r['cache_copies']}")


if __name__ == "__main__":
  main()
