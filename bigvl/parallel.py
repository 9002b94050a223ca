"""Meshes, declarative partition rules and host-local <-> global arrays.

* ``make_mesh(config.mesh)``: axes ``('data', 'fsdp', 'tensor')``; ``-1`` fills the rest.
* Logical axes (the MaxText way): models name each parameter's dimensions (``embed``,
  ``mlp``, ``heads``, ``vocab``, ``layers`` ...); ``config.logical_axis_rules`` (default
  :data:`DEFAULT_LOGICAL_RULES`) maps names to mesh axes. Optimizer state is sharded like its
  parameters. A dimension that a mesh axis does not divide, a parameter without names and a
  large replicated parameter are reported with a warning (never silently).
* Batches are sharded on the leading dimension over ``BATCH_AXES = ('data', 'fsdp')`` and
  built from each host's shard with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bigvl.config import ConfigError, Reader
from bigvl.models import logical

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


#: Logical axis name -> mesh axes (MaxText style). Models name each parameter's dimensions
#: (``nn.with_logical_partitioning``); changing the parallelism is changing this table
#: (``config.logical_axis_rules``), never the model. A name no rule maps is replicated.
DEFAULT_LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),      # model width
    ("mlp", "tensor"),      # MLP hidden
    ("heads", "tensor"),    # attention heads
    ("kv", None),           # per-head features
    ("vocab", "tensor"),    # token embeddings / LM head rows
    ("proj", None),         # the two-tower projection's output
    ("conv_out", "fsdp"),   # output channels of a convolution
    ("conv_in", None),
    ("classes", None),
    ("norm", None),         # LayerNorm / BatchNorm scales and biases
    ("layers", None),       # the stacked axis of scanned layers
    ("lora", "fsdp"),       # LoRA rank (where the factor's other axes leave fsdp free)
    # activations (``logical.constrain`` in the models; bound while the train step is traced)
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
#: A parameter of at least this many values that ends up replicated on a mesh with model
#: axes (fsdp * tensor > 1) is reported.
LARGE_REPLICATED = 1 << 20


def check_logical_rules(rules: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Validates ``config.logical_axis_rules``: ``(logical name, mesh axis | axes | None)``
  pairs -> ``((name, (mesh axes...)), ...)``."""
  out = []
  for item in DEFAULT_LOGICAL_RULES if rules is None else rules:
    if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
      raise ConfigError(f"config.logical_axis_rules entries are (logical name, mesh axes) "
                        f"pairs, got {item!r}")
    name, axes = item
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    for a in axes:
      if a not in MESH_AXES:
        raise ConfigError(f"config.logical_axis_rules: {name!r} -> unknown mesh axis {a!r}; "
                          f"axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def logical_to_spec(names: Sequence[str | None], shape: tuple[int, ...], rules: Sequence,
                    mesh: Mesh, what: str = "", quiet: bool = False) -> PartitionSpec:
  """Logical dimension names -> a PartitionSpec: each dimension takes the first rule for its
  name whose mesh axes this spec does not use yet. A dimension the mesh axes do not divide
  is replicated, with a warning naming ``what`` (never silently) -- unless ``quiet`` (an
  activation, e.g. a decode batch of 1: left to the compiler)."""
  used: set[str] = set()
  out = []
  for dim, (size, name) in enumerate(zip(shape, names, strict=True)):
    axes: tuple[str, ...] = ()
    for rule_name, rule_axes in rules:
      if rule_name == name and not used.intersection(rule_axes):
        axes = rule_axes
        break
    n = math.prod(mesh.shape[a] for a in axes)
    if axes and size % n:
      if not quiet:
        log.warning("sharding: %s dim %d (size %d, %r) not divisible by mesh axes %s (%d): "
                    "replicated", what, dim, size, name, axes, n)
      axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def _is_boxed(x: Any) -> bool:
  return isinstance(x, nn.meta.AxisMetadata)


def logical_names(tree: Any) -> dict[str, tuple[str | None, ...]]:
  """``{path: logical names}`` of the leaves of ``tree`` that carry them (boxed by
  ``nn.with_logical_partitioning`` or scanned with a ``PARTITION_NAME``)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_boxed):
    if isinstance(leaf, nn.Partitioned):
      out[path_str(path)] = tuple(leaf.names)
  return out


@contextlib.contextmanager
def activation_rules(rules: Sequence, mesh: Mesh) -> Iterator[None]:
  """Binds ``rules`` and ``mesh`` for the models' activation constraints
  (:func:`bigvl.models.logical.constrain`) while a step is traced."""
  token = logical.ACTIVATION_RULES.set((tuple(rules), mesh))
  try:
    yield
  finally:
    logical.ACTIVATION_RULES.reset(token)


class WithActivationRules:
  """A jitted function traced (on call or ``lower``) under :func:`activation_rules`."""

  def __init__(self, jitted: Any, rules: Sequence, mesh: Mesh):
    self.jitted, self.rules, self.mesh = jitted, rules, mesh

  def __call__(self, *args):
    with activation_rules(self.rules, self.mesh):
      return self.jitted(*args)

  def lower(self, *args):
    with activation_rules(self.rules, self.mesh):
      return self.jitted.lower(*args)


def unbox(tree: Any) -> Any:
  """The tree with logical-axis boxes removed (plain arrays / ShapeDtypeStructs)."""
  return nn.meta.unbox(tree)


def state_shardings(state: Any, names: dict[str, tuple], rules: Sequence, mesh: Mesh,
                    param_parts: tuple[str, ...] = ("params", "frozen")) -> Any:
  """NamedShardings for every leaf of ``state`` (unboxed arrays or ShapeDtypeStructs).

  A leaf's logical names come from ``names`` (:func:`logical_names` of the boxed state);
  a leaf without them whose path ends with a parameter's path (below one of
  ``param_parts``) and has its shape inherits that parameter's names: optimizer moments are
  sharded like their parameters. Everything else is replicated. On a mesh with model axes
  (``fsdp * tensor > 1``) parameters without logical names, and any leaf of at least
  :data:`LARGE_REPLICATED` values that ends up replicated, are reported with their size.
  """
  rules = check_logical_rules(rules)
  by_rel: dict[str, tuple] = {}
  for path, n in names.items():
    head, _, rel = path.partition("/")
    if head in param_parts:
      by_rel[rel] = n
  model_axes = mesh.shape["fsdp"] * mesh.shape["tensor"] > 1
  unnamed, replicated = [], []

  def one(path, leaf):
    name = path_str(path)
    shape = tuple(getattr(leaf, "shape", ()))
    leaf_names = names.get(name)
    if leaf_names is None:
      parts = name.split("/")
      for i in range(1, len(parts)):
        cand = by_rel.get("/".join(parts[i:]))
        if cand is not None and len(cand) == len(shape):
          leaf_names = cand
          break
    if leaf_names is None:
      if name.partition("/")[0] in param_parts and shape:
        unnamed.append((name, math.prod(shape)))
      spec = PartitionSpec()
    else:
      spec = logical_to_spec(leaf_names, shape, rules, mesh, name)
    size = math.prod(shape) if shape else 1
    if model_axes and size >= LARGE_REPLICATED and all(a is None for a in spec):
      replicated.append((name, size))
    return NamedSharding(mesh, spec)

  out = jax.tree_util.tree_map_with_path(one, state)
  if model_axes and unnamed:
    total = sum(n for _, n in unnamed)
    log.warning("sharding: %d parameter(s) (%s values) have no logical axis names and are "
                "replicated: %s", len(unnamed), f"{total:,}",
                ", ".join(n for n, _ in unnamed[:4]) + (" ..." if len(unnamed) > 4 else ""))
  for name, size in replicated:
    log.warning("sharding: %s (%s values) is replicated on every device of a mesh with "
                "model axes %s", name, f"{size:,}", dict(mesh.shape))
  return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_size_per_host(global_batch: int, mesh: Mesh, key: str = "config.input.batch_size"
                        ) -> int:
  """This host's share of a global batch; ConfigError naming ``key`` unless the mesh's data
  axes and the hosts divide it."""
  shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch % shards:
    raise ConfigError(f"{key}={global_batch} is not divisible by the data axes of the mesh "
                      f"(data*fsdp={shards})")
  if global_batch % jax.process_count():
    raise ConfigError(f"{key}={global_batch} is not divisible by the "
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
