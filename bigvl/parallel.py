"""Meshes, declarative partition rules and host-local <-> global arrays.

* ``make_mesh(config.mesh)``: axes ``('data', 'fsdp', 'tensor')``; ``-1`` fills the rest.
* ``partition_rules``: ``[(regex, spec)]``; the first regex that ``re.search``es a parameter's
  ``/``-joined path gives its ``PartitionSpec``. The same rules shard optimizer state (its
  paths contain the parameter path). A dimension that a mesh axis does not divide is
  replicated instead, with a warning naming the parameter (never silently).
* Batches are sharded on the leading dimension over ``BATCH_AXES = ('data', 'fsdp')`` and
  built from each host's shard with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bigvl.config import ConfigError, Reader

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
log = logging.getLogger(__name__)


def initialize_distributed() -> None:
  """``jax.distributed.initialize()`` on multi-host launches (``BIGVL_MULTIHOST=1``, set by
  the launch/ scripts). Explicit ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` are passed on (local multi-process runs); otherwise JAX finds the
  cluster itself (Cloud TPU, SLURM)."""
  if os.environ.get("BIGVL_MULTIHOST") != "1":
    return
  kwargs = {}
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    kwargs = {"coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
              "num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
              "process_id": int(os.environ["JAX_PROCESS_ID"])}
  if os.environ.get("JAX_PLATFORMS", "") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)


def mesh_shape(mesh_cfg: Reader | dict, num_devices: int) -> tuple[int, ...]:
  """Resolves ``{'data': -1, 'fsdp': 2, 'tensor': 1}`` to sizes whose product is num_devices."""
  get = mesh_cfg.get if hasattr(mesh_cfg, "get") else mesh_cfg.__getitem__
  sizes = []
  for axis in MESH_AXES:
    size = get(axis, 1)
    if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
      raise ConfigError(f"config.mesh.{axis} must be a positive int or -1, got {size!r}")
    sizes.append(size)
  if isinstance(mesh_cfg, Reader):
    extra = set(mesh_cfg.keys()) - set(MESH_AXES)
    if extra:
      raise ConfigError(f"config.mesh has unknown axes {sorted(extra)}; "
                        f"axes are {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ConfigError("config.mesh: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"config.mesh: {num_devices} devices not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    shape = dict(zip(MESH_AXES, sizes, strict=True))
    raise ConfigError(f"config.mesh {shape} needs {math.prod(sizes)} devices, "
                      f"have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg: Reader | dict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def path_str(path: tuple) -> str:
  """A tree path (``params``, ``img``, ``kernel``) -> ``'params/img/kernel'``."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fit_spec(spec: tuple, shape: tuple[int, ...], mesh: Mesh, name: str) -> PartitionSpec:
  spec = tuple(spec)[: len(shape)]
  out = []
  for dim, axis in zip(shape, spec, strict=False):
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      log.warning("sharding: %s dim %d (size %d) not divisible by mesh axes %s (%d): replicated",
                  name, len(out), dim, axes, size)
      out.append(None)
    else:
      out.append(axis if axes else None)
  return PartitionSpec(*out)


def tree_shardings(tree: Any, rules: Sequence[tuple[str, Sequence]], mesh: Mesh) -> Any:
  """NamedShardings for every leaf of ``tree`` (arrays or ShapeDtypeStructs) from the rules."""
  compiled = [(re.compile(rx), tuple(spec)) for rx, spec in rules]

  def one(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    if not shape:
      return NamedSharding(mesh, PartitionSpec())
    for rx, spec in compiled:
      if rx.search(name):
        return NamedSharding(mesh, _fit_spec(spec, shape, mesh, name))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree_util.tree_map_with_path(one, tree)


def check_rules(rules: Any) -> list[tuple[str, tuple]]:
  """Validates ``config.partition_rules``: a sequence of ``(regex, spec)`` pairs."""
  out = []
  for item in rules or ():
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
      raise ConfigError(f"config.partition_rules entries are (regex, spec) pairs, got {item!r}")
    rx, spec = item
    try:
      re.compile(rx)
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.partition_rules: bad regex {rx!r}: {e}") from None
    for axis in spec:
      axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
      for a in axes:
        if a not in MESH_AXES:
          raise ConfigError(f"config.partition_rules: {rx!r} names unknown mesh axis {a!r}")
    out.append((rx, tuple(spec)))
  return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_size_per_host(global_batch: int, mesh: Mesh) -> int:
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch % shards:
    raise ConfigError(f"config.input.batch_size={global_batch} is not divisible by the data "
                      f"axes of the mesh (data*fsdp={shards})")
  if global_batch % jax.process_count():
    raise ConfigError(f"config.input.batch_size={global_batch} is not divisible by the "
                      f"{jax.process_count()} hosts")
  return global_batch // jax.process_count()


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch (leading dim = this host's share) -> global sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def to_host(tree: Any) -> Any:
  """Fully-replicated or addressable arrays -> numpy (gathers across hosts when needed)."""
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(one, tree)
