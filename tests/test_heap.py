"""``runtime.host_heap`` (bigvl/heap.py): which runs keep XLA's per-step scratch memory
mapped, and that under the tunables a compiled step's second execution touches no fresh page
(the page faults and ``munmap`` that cost the S16 step ~1 s of its 8.6)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from bigvl import heap
from tests.helpers import REPO, subprocess_env

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def test_modes_resolve():
  assert heap.resolve("retain") == "retain" and heap.resolve("system") == "system"
  assert heap.resolve("auto", {"JAX_PLATFORMS": "cuda"}) == "system"
  assert heap.resolve("auto", {"JAX_PLATFORMS": "cpu"}) == ("retain" if GLIBC else "system")
  with pytest.raises(ValueError, match="one of auto, retain, system"):
    heap.resolve("yes")


def test_cpu_backend_expected_reads_jax_platforms():
  assert heap.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
  assert not heap.cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})
  assert not heap.cpu_backend_expected({"JAX_PLATFORMS": "cuda"})


def test_tunables_merge_and_never_override_the_users():
  env = heap.retain_environ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "X": "1"})
  assert env["X"] == "1"
  assert env["GLIBC_TUNABLES"].split(":") == ["glibc.cpu.hwcaps=-AVX512F",
                                              *heap.RETAIN_TUNABLES]
  assert heap.retain_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) is None
  assert heap.retain_environ(env) is None  # after the re-exec: nothing more to do
  back = heap.system_environ(env)  # a 'system' child of a retained parent drops ours only
  assert back["GLIBC_TUNABLES"] == "glibc.cpu.hwcaps=-AVX512F" and back["X"] == "1"
  assert "GLIBC_TUNABLES" not in heap.system_environ(heap.retain_environ({}))
  assert heap.system_environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) is None


PROBE = textwrap.dedent("""
    import resource, sys
    from bigvl import heap
    heap.ensure(sys.argv[1])
    import jax, jax.numpy as jnp

    @jax.jit
    def step(x, w):
      return jnp.tanh(x @ w) @ w.T  # tanh(x @ w): a [4096, 4096] f32 temporary, 64 MiB

    x, w = jnp.ones((4096, 64)), jnp.ones((64, 4096)) / 64
    faults = []
    for _ in range(16):
      r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      step(x, w).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print(heap.in_effect(), *faults)
""")


def _probe(mode: str) -> tuple[bool, list[int]]:
  """Starts the probe with the environment of the other mode, so that :func:`heap.ensure`
  re-executes it either way (adding the tunables, or dropping inherited ones)."""
  env = subprocess_env({"JAX_PLATFORMS": "cpu"})
  if mode == "retain":
    env.pop("GLIBC_TUNABLES", None)
  else:
    env = heap.retain_environ(env) or env
  out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  flag, *faults = out.stdout.split()
  return flag == "True", [int(f) for f in faults]


@pytest.mark.skipif(not GLIBC, reason="glibc tunables")
def test_retained_heap_reuses_the_step_scratch_without_page_faults():
  """glibc's default maps each execution's scratch afresh (every step faults all its pages);
  the retained heap faults a page only when the heap grows past its high-water mark, which
  holds a few scratch buffers at most (asynchronous dispatch can allocate the next
  execution's before the previous one's is freed)."""
  pages = 4096 * 4096 * 4 // os.sysconf("SC_PAGE_SIZE")
  retained, kept = _probe("retain")  # re-executes itself under the tunables
  assert retained
  assert sorted(kept)[len(kept) // 2] < pages // 20, kept  # most steps fault nothing
  retained, fresh = _probe("system")  # re-executes itself without them
  assert not retained
  assert min(fresh[1:]) > pages // 2, fresh  # every step faults its scratch in
  assert sum(kept) < sum(fresh) / 2, (kept, fresh)
