"""Collective volume of the real bigvl train step on a pure FSDP mesh, against FSDP's minimum.

  python -m bench.collectives [--devices 8] [--sizes tiny,s16] [--out bench/collectives.md]

The step is the one ``bigvl.train`` runs (``train.build`` -> ``compile_run``) for
``configs/siglip_shapes.py`` on ``mesh = {data: 1, fsdp: N, tensor: 1}`` of N simulated CPU
devices (``--xla_force_host_platform_device_count``, set before jax is imported: run this
file as a script or module, not from a process that already imported jax). It is lowered
for abstract inputs (``jax.ShapeDtypeStruct`` with the run's shardings: nothing is allocated)
and compiled; the compiled module's HLO text (``compiled.as_text()``) is parsed here.

Counting (:func:`collectives`). Every ``all-gather``, ``reduce-scatter``, ``all-reduce``,
``all-to-all`` and ``collective-permute`` (and their ``-start`` async forms) is counted with
its **array bytes** ``S``, what one device holds of the array the collective is about:

* all-gather: the gathered result (``S = n x`` the operand, ``n`` the replica-group size);
* reduce-scatter: the operand, i.e. the full array before scattering (``S = n x`` result);
* all-reduce, all-to-all, collective-permute: the operand.

Wire bytes per device on a ring are ``(n-1)/n S`` for all-gather and reduce-scatter and
``2 (n-1)/n S`` for all-reduce; the ratios below are the same in either unit. An op in a
computation reached through ``while`` bodies counts ``prod(trip counts)`` times: the trip count
is the while's ``known_trip_count`` backend config, else the one integer constant of its
condition (a ``lax.scan`` / ``fori_loop`` counter from 0 compared ``LT`` to it).

Reduce-scatter as all-reduce + slice. XLA's CPU pipeline has no reduce-scatter creator: the
SPMD partitioner's "reduce the partial sums, keep my shard" is an ``all-reduce`` whose every
consumer takes a ``1/n`` slice at an offset computed from ``partition-id`` (GPU and TPU
rewrite exactly that pattern into a ``reduce-scatter``). Such an all-reduce (per tuple
element, for combined all-reduces) is counted as a reduce-scatter of the same ``S`` and
flagged ``via_all_reduce`` (column "of which AR+slice"); the "as compiled" all-reduce total
keeps it too.

Buckets. Each counted array is put in one bucket by its shape: ``scalar`` (one value: loss,
metrics, norms), ``param`` (its dims, ignoring 1s, are those of a parameter of the state after
gathering over the batch axes) or ``activation`` (everything else: the loss's embeddings and
any activation resharding).

The FSDP minimum (:func:`fsdp_minimum`). Parameter ``p`` of ``P_p`` bytes (dtype as stored)
sharded over the batch axes (``data``, ``fsdp``) by a factor ``f_p > 1``:

* all-gather ``G_p = P_p / t_p`` once per step (``t_p``: its sharding over the other axes,
  1 on a pure FSDP mesh); ``gathers = 2`` if the backward re-gathers instead of keeping the
  gathered copy (remat), ``1`` otherwise (the towers here keep it);
* reduce-scatter ``G_p`` of its gradient, if trainable;
* a trainable ``p`` replicated over the batch axes (``f_p = 1``: LayerNorm scales and biases,
  ``t'``, ``b``) all-reduces its gradient, ``G_p``.

  AG_min = gathers * sum_{f_p > 1} G_p,   RS_min = sum_{trainable, f_p > 1} G_p,
  AR_min = sum_{trainable, f_p = 1} G_p

Loss collectives (:func:`loss_minimum`), inherent to a batch-sharded contrastive loss and
counted apart (``activation`` bucket): the sigmoid loss over ``zimg [N, E]`` and
``ztxt [M, E]`` (``M = N K``) needs one of them all-gathered, ``E min(N, M) 4`` bytes
(float32), and the gradient of that gathered copy reduce-scattered, the same ``S``; the task's
mean-logit metrics all-reduce ``sum_i zimg_i`` and ``sum_j ztxt_j``, ``2 E 4`` bytes. Scalars
(the loss, metrics, partial norms: 4 bytes each) are listed but have no minimum.

``ratio = measured / minimum`` per collective type and bucket; the test
(``tests/test_collectives.py``) holds the tiny config to ``<= 1.05``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([0-9,<=]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(calls|body|condition|to_apply|true_computation|false_computation|"
                     r"branch_computations|async_execution_thread|called_computations)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass
class Instr:
  name: str
  shape: str  # the result shape text, e.g. ``f32[8,64]{1,0}`` or ``(f32[], s32[4])``
  opcode: str
  operands: list[str]
  attrs: str  # everything after the operand list
  args: str = ""  # the operand list's text (a constant's value)


@dataclasses.dataclass
class Collective:
  """One array moved by one collective op: ``bytes`` (``S`` of the module doc) per execution,
  ``count`` executions per step (the product of enclosing while-loop trip counts)."""

  kind: str
  bytes: float
  count: int
  group: int
  dims: tuple[int, ...]
  dtype: str
  name: str
  computation: str
  op_name: str
  via_all_reduce: bool = False  # a reduce-scatter compiled as all-reduce + partition slice

  @property
  def total(self) -> float:
    return self.bytes * self.count


def _split_top(s: str, open_: str = "(", close: str = ")") -> tuple[str, str]:
  """``'(a(b)c) rest'`` -> ``('a(b)c', ' rest')``: the first balanced group and what follows."""
  assert s[0] == open_, s
  depth = 0
  for i, ch in enumerate(s):
    depth += ch == open_
    depth -= ch == close
    if depth == 0:
      return s[1:i], s[i + 1:]
  raise ValueError(f"unbalanced {open_}{close} in {s[:80]!r}")


def parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):
    inner, rest = _split_top(rest)
    shape = f"({inner})"
  else:
    shape, _, rest = rest.partition(" ")
  rest = rest.lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  args, attrs = _split_top(rest[len(op.group(1)):])
  operands = re.findall(r"%([\w.\-]+)", args)
  return Instr(name, shape, op.group(1), operands, attrs, args)


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
  """HLO module text -> ``({computation: [instructions]}, entry computation name)``."""
  comps: dict[str, list[Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith("HloModule"):
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    ins = parse_instr(line)
    if ins is not None:
      comps[current].append(ins)
  if not entry:
    raise ValueError("no ENTRY computation in the HLO text")
  return comps, entry


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """``'(f32[8,4]{1,0}, s32[])'`` -> ``[('f32', (8, 4)), ('s32', ())]`` (tokens skipped)."""
  out = []
  for dt, dims in _ARRAY.findall(shape):
    if dt not in DTYPE_BYTES:
      continue
    out.append((dt, tuple(int(d.replace("<=", "")) for d in dims.split(",") if d)))
  return out


def nbytes(dt: str, dims: tuple[int, ...]) -> float:
  return DTYPE_BYTES[dt] * math.prod(dims)


def group_size(attrs: str, num_partitions: int) -> int:
  """The replica-group size of a collective from its ``replica_groups=`` attribute (the list,
  iota ``[G,n]<=[...]`` and ``mesh[...] {axes}`` forms; ``{}`` = every partition)."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  return num_partitions


def trip_count(ins: Instr, comps: dict[str, list[Instr]]) -> int:
  """A while loop's trip count: ``known_trip_count`` or the condition's one int constant."""
  m = _TRIP.search(ins.attrs)
  if m:
    return int(m.group(1))
  cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs).group(1)
  seen, todo, consts = set(), [cond], set()
  while todo:  # the condition and the fusions it calls
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    for i in comps[c]:
      if i.opcode == "constant" and re.match(r"^[su](8|16|32|64)\[\]", i.shape):
        consts.add(int(i.args))
      todo += [n for _, v in _CALLED.findall(i.attrs) for n in re.findall(r"[\w.\-]+", v)]
  if len(consts) != 1:
    raise ValueError(f"while {ins.name}: no known_trip_count and {len(consts)} integer "
                     f"constants in its condition {cond}: trip count unknown")
  return consts.pop()


def multiplicities(comps: dict[str, list[Instr]], entry: str) -> dict[str, int]:
  """Executions per step of every computation reached from ``entry``: a while body runs
  trip-count times per execution of its caller; every other call (fusion, call, conditional
  branch, reducer) once."""
  calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # callee -> (caller, factor)
  for cname, instrs in comps.items():
    for ins in instrs:
      for key, val in _CALLED.findall(ins.attrs):
        factor = 1
        if ins.opcode == "while" and key in ("body", "condition"):
          factor = trip_count(ins, comps) + (key == "condition")
        for callee in re.findall(r"[\w.\-]+", val):
          if callee in comps:
            calls[callee].append((cname, factor))
  memo: dict[str, int] = {entry: 1}

  def mult(c: str) -> int:
    if c not in memo:
      memo[c] = 0  # cycles do not occur in HLO; guards the recursion anyway
      memo[c] = sum(mult(caller) * f for caller, f in calls.get(c, ()))
    return memo[c]

  return {c: mult(c) for c in comps}


def _pid_derived(instrs: list[Instr]) -> set[str]:
  """Names of ``partition-id`` / ``replica-id`` and integer scalars computed from them."""
  out: set[str] = set()
  for i in instrs:  # HLO text lists operands before their users
    if i.opcode in ("partition-id", "replica-id"):
      out.add(i.name)
    elif re.match(r"^[su](8|16|32|64)\[\]", i.shape) and out.intersection(i.operands):
      out.add(i.name)
  return out


def collectives(text: str) -> list[Collective]:
  """Every array every collective of the compiled module ``text`` moves (module doc)."""
  comps, entry = parse_module(text)
  m = re.search(r"num_partitions=(\d+)", text)
  num_partitions = int(m.group(1)) if m else 1
  mult = multiplicities(comps, entry)
  out = []
  for cname, instrs in comps.items():
    if not mult.get(cname):
      continue
    shapes = {i.name: i.shape for i in instrs}
    users: dict[str, list[Instr]] = defaultdict(list)
    for i in instrs:
      for o in set(i.operands):
        users[o].append(i)
    pid = _pid_derived(instrs)
    for ins in instrs:
      kind = ins.opcode.removesuffix("-start")
      if kind not in KINDS:
        continue
      n = group_size(ins.attrs, num_partitions)
      op_name = re.search(r'op_name="([^"]*)"', ins.attrs)
      op_name = op_name.group(1) if op_name else ""
      operand_arrays = [a for o in ins.operands for a in arrays(shapes.get(o, ""))]
      if kind == "all-gather":  # S = the gathered result = n x the operand
        elems = [(dt, dims, nbytes(dt, dims) * n) for dt, dims in operand_arrays]
        if ins.opcode == "all-gather":
          elems = [(dt, dims, nbytes(dt, dims)) for dt, dims in arrays(ins.shape)]
      else:  # S = the operand (reduce-scatter: the full array before the scatter)
        elems = [(dt, dims, nbytes(dt, dims)) for dt, dims in operand_arrays]
      tuple_out = ins.shape.startswith("(")
      for idx, (dt, dims, size) in enumerate(elems):
        k, via = kind, False
        if kind == "all-reduce" and n > 1 and ins.opcode == "all-reduce":
          values = [ins.name]
          if tuple_out:
            values = [g.name for g in users[ins.name] if g.opcode == "get-tuple-element"
                      and re.search(rf"\bindex={idx}\b", g.attrs)]
          want = math.prod(dims) // n
          if values and all(_keeps_slice(v, users, want, comps, pid) for v in values):
            k, via = "reduce-scatter", True
        out.append(Collective(k, size, mult[cname], n, dims, dt, ins.name, cname, op_name,
                              via))
  return out


_PASS = ("bitcast", "copy", "transpose", "reshape")


def _keeps_slice(value: str, instrs_users: dict[str, list[Instr]], want: int,
                 comps: dict[str, list[Instr]], pid: set[str] | None) -> bool:
  """Every use of ``value`` (through bitcast / copy / transpose / reshape) is a
  ``dynamic-slice`` of ``want`` elements, directly or inside a fusion it feeds; at the top
  level (``pid`` given) each such consumer also takes a partition-id-derived operand."""
  users = instrs_users.get(value, [])
  if not users:
    return False
  for u in users:
    if u.opcode in _PASS:
      if not _keeps_slice(u.name, instrs_users, want, comps, pid):
        return False
      continue
    if pid is not None and not pid.intersection(u.operands):
      return False
    if u.opcode == "dynamic-slice":
      if u.operands[0] != value or math.prod(arrays(u.shape)[0][1]) != want:
        return False
    elif u.opcode == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", u.attrs)
      body = comps.get(called.group(1), []) if called else []
      params = {i.name for i in body if i.opcode == "parameter"
                and int(i.args) in [k for k, o in enumerate(u.operands) if o == value]}
      inner_users: dict[str, list[Instr]] = defaultdict(list)
      for i in body:
        for o in set(i.operands):
          inner_users[o].append(i)
      if not params or not all(_keeps_slice(p, inner_users, want, comps, None)
                               for p in params):
        return False
    else:
      return False
  return True


def squeeze(dims: Iterable[int]) -> tuple[int, ...]:
  return tuple(sorted(d for d in dims if d != 1))


# --- the FSDP minimum -------------------------------------------------------------------------

BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass
class ParamTraffic:
  """One parameter leaf: ``gathered`` = ``G_p`` bytes (module doc), ``sharded`` = ``f_p > 1``."""

  path: str
  dims: tuple[int, ...]  # gathered over the batch axes
  gathered: float
  sharded: bool
  trainable: bool


def _spec_axes(entry: Any) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_traffic(abstract_state: dict, mesh: Any) -> list[ParamTraffic]:
  """The ``params`` (trainable) and ``frozen`` leaves of a train state of
  ``jax.ShapeDtypeStruct``s with ``NamedSharding``s -> their FSDP traffic terms."""
  import jax

  from bigvl import parallel

  out = []
  for part, trainable in (("params", True), ("frozen", False)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.get(part, {})):
      spec = tuple(leaf.sharding.spec) + (None,) * (len(leaf.shape) - len(leaf.sharding.spec))
      dims, f = [], 1
      for size, entry in zip(leaf.shape, spec, strict=True):
        axes = _spec_axes(entry)
        gather = math.prod(mesh.shape[a] for a in axes if a in BATCH_AXES)
        keep = math.prod(mesh.shape[a] for a in axes if a not in BATCH_AXES)
        f *= gather
        dims.append(size // keep)
      g = math.prod(dims) * leaf.dtype.itemsize
      out.append(ParamTraffic(f"{part}/{parallel.path_str(path)}", tuple(dims), g, f > 1,
                              trainable))
  return out


def fsdp_minimum(params: list[ParamTraffic], gathers: int = 1) -> dict[str, float]:
  """``{kind: bytes}``: ``AG = gathers sum_{f_p>1} G_p``, ``RS = sum_{trainable, f_p>1} G_p``,
  ``AR = sum_{trainable, f_p=1} G_p`` (module doc)."""
  out = dict.fromkeys(KINDS, 0.0)
  for p in params:
    if p.sharded:
      out["all-gather"] += gathers * p.gathered
      if p.trainable:
        out["reduce-scatter"] += p.gathered
    elif p.trainable and math.prod(p.dims) > 1:  # one-value grads (t', b) count as scalars
      out["all-reduce"] += p.gathered
  return out


def loss_minimum(loss_name: str, loss_impl: str, n: int, m: int, e: int, shards: int
                 ) -> dict[str, float] | None:
  """``{kind: bytes}`` a batch-sharded two-tower loss needs over ``zimg [n, e]``, ``ztxt
  [m, e]`` (float32) on ``shards`` batch shards: the sigmoid loss gathers one side,
  ``AG = RS = 4 e min(n, m)``; the mean-logit metrics all-reduce two ``[e]`` sums,
  ``AR = 8 e``. None for a loss this does not model (the ring's ppermutes, CLIP's softmax)."""
  if (loss_name, loss_impl) != ("sigmoid", "dense"):
    return None
  out = dict.fromkeys(KINDS, 0.0)
  if shards > 1:
    out["all-gather"] = out["reduce-scatter"] = 4.0 * e * min(n, m)
    out["all-reduce"] = 8.0 * e
  return out


def summarise(colls: list[Collective], params: list[ParamTraffic]) -> dict[str, dict]:
  """Per kind: ``total`` (as counted, AR+slice as reduce-scatter), ``via_all_reduce``,
  ``scalar`` (one-value arrays), ``param_shaped`` and ``other`` (neither: loss, activations),
  ``ops`` (op executions)."""
  shapes = {squeeze(p.dims) for p in params}
  out = {k: dict(total=0.0, via_all_reduce=0.0, scalar=0.0, param_shaped=0.0, other=0.0,
                 ops=0) for k in KINDS}
  for c in colls:
    s = out[c.kind]
    s["total"] += c.total
    s["ops"] += c.count
    if c.via_all_reduce:
      s["via_all_reduce"] += c.total
    bucket = ("scalar" if math.prod(c.dims) == 1 else
              "param_shaped" if squeeze(c.dims) in shapes else "other")
    s[bucket] += c.total
  return out


# --- the benchmark ------------------------------------------------------------------------------

def _uses_remat(tree: Any) -> bool:
  if isinstance(tree, dict):
    return any(k == "remat" and v not in (False, None, "none") or _uses_remat(v)
               for k, v in tree.items())
  return False


def analyse(spec: str, overrides: list[str], devices: int) -> dict[str, Any]:
  """Compiles the train step of ``spec`` (+ ``--config.x=y`` ``overrides``) on the pure FSDP
  mesh ``{data: 1, fsdp: devices, tensor: 1}`` for abstract inputs and counts its
  collectives against the minimum."""
  import jax

  from bench.throughput import prepare_data
  from bigvl import parallel, train
  from bigvl.main import _parse

  if jax.device_count() != devices:
    raise RuntimeError(f"{jax.device_count()} devices, want {devices}: set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={devices} before jax loads")
  mesh_flags = ["--config.mesh.data=1", f"--config.mesh.fsdp={devices}",
                "--config.mesh.tensor=1"]
  c = _parse(["bench.collectives", "--config", spec, *mesh_flags, *overrides],
             need_workdir=False).config
  with c.unlocked():
    c.evals = {}  # the step is what is measured
  prepare_data(c)
  run = train.build(c)
  local = next(run.task.train_data(run.seed))  # shapes and dtypes only
  sh = parallel.batch_sharding(run.mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), local)
  t0 = time.perf_counter()
  fns = train.compile_run(run, batch)
  compiled = fns.step.lower(fns.abstract_state, batch).compile()
  compile_s = time.perf_counter() - t0
  colls = collectives(compiled.as_text())
  params = param_traffic(fns.abstract_state, run.mesh)
  gathers = 2 if _uses_remat(c.model.to_dict()) else 1
  n, k = batch["tokens"].shape[:2]
  loss = loss_minimum(c.loss.get("name", "sigmoid"), c.loss.get("impl", "dense"), n, n * k,
                      int(c.model.embed_dim), devices)
  return {"spec": " ".join([spec, *overrides]), "label": spec, "devices": devices,
          "compile_s": compile_s,
          "batch": {key: list(v.shape) for key, v in batch.items()},
          "params": params, "collectives": colls, "summary": summarise(colls, params),
          "param_min": fsdp_minimum(params, gathers), "loss_min": loss, "gathers": gathers,
          "param_bytes": sum(p.gathered for p in params),
          "sharded_bytes": sum(p.gathered for p in params if p.sharded)}


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
  """``(measured - scalars) / (param minimum + loss minimum)`` per kind and for their sum
  (``'total'``); None where both are 0, inf where only the minimum is."""
  out, got_all, want_all = {}, 0.0, 0.0
  for kind in KINDS:
    s = res["summary"][kind]
    got = s["total"] - s["scalar"]
    want = res["param_min"][kind] + (res["loss_min"] or {}).get(kind, 0.0)
    got_all, want_all = got_all + got, want_all + want
    out[kind] = got / want if want else (None if got == 0 else math.inf)
  out["total"] = got_all / want_all if want_all else None
  return out


def _kib(x: float) -> str:
  return f"{x / 2**10:,.1f}"


def format_table(results: list[dict[str, Any]]) -> str:
  """One markdown row per (config, collective kind) that occurs or has a minimum, + a total."""
  rows = ["| step (N devices, pure FSDP) | collective | ops | measured KiB | of which AR+slice "
          "| scalars | not param-shaped | FSDP params min | loss min | ratio |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for res in results:
    r, loss, tot = ratios(res), res["loss_min"], defaultdict(float)
    for kind in KINDS:
      s = res["summary"][kind]
      if not s["ops"] and not res["param_min"][kind]:
        continue
      vals = [s["total"], s["via_all_reduce"], s["scalar"], s["other"],
              res["param_min"][kind], loss[kind] if loss else 0.0]
      for i, v in enumerate(vals):
        tot[i] += v
      tot["ops"] += s["ops"]
      cells = [_kib(v) for v in vals[:5]] + [_kib(vals[5]) if loss else "n/a"]
      rows.append(f"| {res['label']} ({res['devices']}) | {kind} | {s['ops']} | "
                  f"{' | '.join(cells)} | {_fmt_ratio(r[kind])} |")
    cells = [_kib(tot[i]) for i in range(6)]
    rows.append(f"| {res['label']} ({res['devices']}) | **all** | {int(tot['ops'])} | "
                f"{' | '.join(cells)} | **{_fmt_ratio(r['total'])}** |")
  return "\n".join(rows)


def _fmt_ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def top_ops(res: dict[str, Any], k: int = 15) -> str:
  """The ``k`` largest counted arrays (to see where an excess comes from)."""
  cs = sorted(res["collectives"], key=lambda c: -c.total)[:k]
  return "\n".join(f"  {c.kind:<18} {c.dtype}{list(c.dims)} x{c.count}: {_kib(c.total)} KiB"
                   f"{' (AR+slice)' if c.via_all_reduce else ''}  {c.op_name[:110]}"
                   for c in cs)


#: The rules ``configs/siglip_shapes.py`` had before (docs/scaling.md, "Collective volume"):
#: the token table split by its ``embed`` columns over ``fsdp`` (``vocab -> tensor``) and no
#: activation rules (the towers' ``logical.constrain`` calls then leave the batch sharding
#: to the compiler).
OLD_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
             ("kv", None), ("proj", None), ("norm", None))
_OLD = [f"--config.logical_axis_rules={OLD_RULES!r}"]
_S16 = ("configs/siglip_shapes.py:size=s16", ["--config.input.batch_size=32"])

#: ``--sizes`` name -> (label, config, overrides) of one compiled step.
SIZES = {
    "tiny": ("tiny, config's rules", "configs/siglip_shapes.py:tiny", []),
    "tiny_old_rules": ("tiny, old rules", "configs/siglip_shapes.py:tiny", _OLD),
    "s16": ("S16 batch 32, config's rules", *_S16),
    "s16_old_rules": ("S16 batch 32, old rules", _S16[0], [*_S16[1], *_OLD]),
}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
  p.add_argument("--out", default=None, help="write the markdown table here")
  p.add_argument("--top", type=int, default=0, help="also print the N largest collectives")
  p.add_argument("--json", default=None, help="write label, ratios, summary, minima here")
  args, overrides = p.parse_known_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  results = []
  for size in args.sizes.split(","):
    label, spec, extra = SIZES[size]
    res = analyse(spec, [*extra, *overrides], args.devices)
    res["label"] = label + (f" {' '.join(overrides)}" if overrides else "")
    results.append(res)
    print(f"{res['label']} = {res['spec']}: batch {res['batch']}, "
          f"compile {res['compile_s']:.0f} s, "
          f"parameters {_kib(res['param_bytes'])} KiB ({_kib(res['sharded_bytes'])} sharded), "
          f"gathers per parameter assumed {res['gathers']}", flush=True)
    if args.top:
      print(top_ops(res, args.top), flush=True)
  table = format_table(results)
  print(table)
  if args.json:
    keys = ("label", "spec", "devices", "compile_s", "summary", "param_min", "loss_min",
            "param_bytes", "sharded_bytes", "gathers")
    with open(args.json, "w") as f:
      json.dump([{**{k: r[k] for k in keys}, "ratios": ratios(r)} for r in results], f)
  if args.out:
    cmd = " ".join(["python -m bench.collectives", *(argv if argv is not None
                                                     else sys.argv[1:])])
    with open(args.out, "w") as f:
      f.write(f"# Collective volume of the train step on a pure FSDP mesh\n\n"
              f"Command: `{cmd}`\n\n{table}\n")
  return results


if __name__ == "__main__":
  main()
