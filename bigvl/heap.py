"""The host heap of a CPU run: keep XLA's per-step scratch memory mapped between steps.

XLA:CPU allocates one temp buffer per execution of a compiled step -- every activation kept
for the backward, the gradients, scratch: 4.6 GB for the SigLIP S16 step at batch 32 -- and
frees it when the step ends. glibc's ``malloc`` serves a request that large with a fresh
``mmap`` (above its 32 MB mmap threshold, or from a thread whose arena cannot hold it) and
``free`` gives it back with ``munmap``. Every step then pays for

* the ``munmap`` of the previous step's buffer (~0.3 s at S16, with nothing else running),
* one page fault per 4 KiB page touched (1.2 million at S16) and the kernel zeroing it:
  2.2 s of system CPU time a step on 2 cores.

``runtime.host_heap = 'retain'`` runs the process with glibc tunables that make the heap keep
what it once held: one arena (``glibc.malloc.arena_max=1``, so XLA's threads allocate from the
``brk`` heap, not from per-thread arenas too small for the buffer), no ``mmap`` chunks
(``mmap_max=0``) and no trimming of the heap's top below 64 GiB free
(``trim_threshold``). The next step's ``malloc`` finds the freed buffer, already faulted in;
a page faults only when the heap grows past its high-water mark (a few buffers at most:
asynchronous dispatch can allocate one execution's buffer before the previous one is freed):
at S16, f32, batch 32, the step goes from 9.1 to 7.8 s and from 1.2 million page faults to 50
(``python -m bench.host_heap``, docs/benchmarks.md). The price is the caching allocators'
price: the process's resident memory stays at its peak instead of shrinking between steps.

glibc reads tunables only at process start, so :func:`ensure` re-executes the current command
(``os.execve``, same process id) with ``GLIBC_TUNABLES`` set, before jax has started a thread.
``'auto'`` (the default) means ``'retain'`` where it applies -- Linux with glibc, and a run on
the CPU backend (``JAX_PLATFORMS=cpu``, or no accelerator plugin installed) -- and
``'system'`` (glibc's defaults, nothing re-executed) elsewhere: on a GPU/TPU host the step's
buffers live on the device, and one arena would serialize the input pipeline's threads.
A ``GLIBC_TUNABLES`` that already sets any ``glibc.malloc.*`` tunable is the user's choice and
is left alone. A tool that starts the command and follows its interpreter (``py-spy record --
python -m bigvl.main ...``) loses it at the re-exec: give such runs
``--config.runtime.host_heap=system``, or export :data:`RETAIN_TUNABLES` as
``GLIBC_TUNABLES`` first (then nothing is re-executed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

MODES = ("auto", "retain", "system")
#: glibc malloc tunables of ``'retain'`` (see the module docstring).
RETAIN_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
                   f"glibc.malloc.trim_threshold={64 << 30}")


def cpu_backend_expected(environ: dict[str, str] | None = None) -> bool:
  """Whether jax will run on its CPU backend, decided without starting it: ``JAX_PLATFORMS``
  names only ``cpu``, or no accelerator plugin (a ``jax_plugins`` entry point: CUDA, ROCm;
  ``libtpu``) is installed."""
  env = os.environ if environ is None else environ
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return set(platforms) <= {"cpu"}
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return importlib.util.find_spec("libtpu") is None


def resolve(mode: str, environ: dict[str, str] | None = None) -> str:
  """``'retain'`` or ``'system'`` for ``runtime.host_heap = mode``; ValueError on a mode not
  in :data:`MODES`."""
  if mode not in MODES:
    raise ValueError(f"config.runtime.host_heap={mode!r}: one of {', '.join(MODES)}")
  if mode != "auto":
    return mode
  glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
  return "retain" if glibc and cpu_backend_expected(environ) else "system"


def retain_environ(environ: dict[str, str]) -> dict[str, str] | None:
  """``environ`` with :data:`RETAIN_TUNABLES` added to ``GLIBC_TUNABLES``; None when it
  already sets malloc tunables (ours, after the re-exec, or the user's)."""
  current = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc." in current:
    return None
  env = dict(environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (current, *RETAIN_TUNABLES) if t)
  return env


def system_environ(environ: dict[str, str]) -> dict[str, str] | None:
  """``environ`` without :data:`RETAIN_TUNABLES` (inherited from a parent that had them);
  None when it has none of them."""
  current = environ.get("GLIBC_TUNABLES", "").split(":")
  kept = [t for t in current if t and t not in RETAIN_TUNABLES]
  if len(kept) == len([t for t in current if t]):
    return None
  env = dict(environ)
  env.pop("GLIBC_TUNABLES")
  if kept:
    env["GLIBC_TUNABLES"] = ":".join(kept)
  return env


def ensure(mode: str) -> None:
  """Re-executes this process's command line so that :data:`RETAIN_TUNABLES` are in effect
  exactly when ``mode`` resolves to ``'retain'`` (added, or removed when a ``'system'``
  process inherited them); returns when they already are. Call it from a command's entry
  point before jax starts (``bigvl.main``, ``bigvl.eval``, ``bench.throughput``), never
  from a library function: the process is replaced."""
  environ = dict(os.environ)
  env = (retain_environ(environ) if resolve(mode) == "retain" else system_environ(environ))
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def in_effect() -> bool:
  """Whether this process runs with :data:`RETAIN_TUNABLES`."""
  return all(t in os.environ.get("GLIBC_TUNABLES", "").split(":") for t in RETAIN_TUNABLES)
