"""bench/collectives.py: the HLO collective counter on hand-made programs of known volume
(shard_map all-gather / psum / psum_scatter, inside fori_loops, AR + slice from the SPMD
partitioner, a hand-written while loop without a known trip count), and the real tiny
SigLIP train step on a pure FSDP mesh of 8 devices at its FSDP minimum (ratio within 5%).

The 8 simulated devices come from tests/conftest.py (the XLA flag is set before jax loads).
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from bench import collectives as C


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return jax.make_mesh((8,), ("i",), axis_types=(AxisType.Auto,))


def _count(fn, *args):
  return [(c.kind, c.bytes, c.count, c.via_all_reduce)
          for c in C.collectives(fn.lower(*args).compile().as_text())]


def _smap(mesh, f, out=None):
  out = P() if out is None else out
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("i"), out_specs=out, check_vma=False))


def _x(mesh, shape=(64, 16)):
  return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("i")))


def _grow(c):  # c [8, 16] -> c + a function of its all-gather (so the loop cannot hoist it)
  return c + 0.1 * jax.lax.all_gather(c, "i", tiled=True).reshape(8, 8, 16).sum(0)


def test_all_gather_and_reduce_scatter_sizes(mesh):
  x = _x(mesh)  # [64, 16] f32 = 4096 bytes, [8, 16] a device
  assert _count(_smap(mesh, lambda a: jax.lax.all_gather(a, "i", tiled=True)), x) == [
      ("all-gather", 4096, 1, False)]
  rs = _smap(mesh, lambda a: jax.lax.psum_scatter(jnp.tile(a, (8, 1)), "i", tiled=True), P("i"))
  assert _count(rs, x) == [("reduce-scatter", 4096, 1, False)]  # the operand, before scatter


def test_ops_in_loops_count_trip_count_times(mesh):
  x = _x(mesh)
  loop = _smap(mesh, lambda a: jax.lax.fori_loop(0, 5, lambda i, c: _grow(c), a), P("i"))
  assert _count(loop, x) == [("all-gather", 4096, 5, False)]

  def nested(a):
    def outer(i, c):
      c = jax.lax.fori_loop(0, 3, lambda j, c: _grow(c), c)
      return c + jax.lax.psum(c, "i")
    return jax.lax.fori_loop(0, 4, outer, a)

  got = sorted(_count(_smap(mesh, nested, P("i")), x))
  assert got == [("all-gather", 4096, 12, False), ("all-reduce", 512, 4, False)]


def test_all_reduce_plus_partition_slice_is_a_reduce_scatter(mesh):
  x, y = _x(mesh), _x(mesh, (64, 32))  # x^T y contracts the sharded dim: partial sums
  keep_shard = jax.jit(lambda a, b: a.T @ b, out_shardings=NamedSharding(mesh, P("i")))
  assert _count(keep_shard, x, y) == [("reduce-scatter", 16 * 32 * 4, 1, True)]
  replicated = jax.jit(lambda a, b: a.T @ b, out_shardings=NamedSharding(mesh, P()))
  assert _count(replicated, x, y) == [("all-reduce", 16 * 32 * 4, 1, False)]


HAND_WRITTEN = """HloModule m, num_partitions=4

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = f32[32]{0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %s = f32[8]{0} slice(%ag), slice={[0:8]}
  ROOT %t = (s32[], f32[8]{0}) tuple(%next, %s)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8]) -> (f32[8], bf16[2,3]) {
  %x = f32[8]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8]{0}) tuple(%zero, %x)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %out = f32[8]{0} get-tuple-element(%w), index=1
  %h = bf16[2,3]{1,0} constant({...})
  %ar = (f32[8]{0}, bf16[2,3]{1,0}) all-reduce(%out, %h), replica_groups={{0,1},{2,3}},
      to_apply=%add
  ROOT %r = (f32[8]{0}, bf16[2,3]{1,0}) tuple(%ar)
}
"""


def test_hand_written_while_without_known_trip_count():
  got = [(c.kind, c.bytes, c.count, c.group, c.dtype) for c in C.collectives(HAND_WRITTEN)]
  assert got == [("all-gather", 128, 7, 4, "f32"),  # 7 = the condition's constant
                 ("all-reduce", 32, 1, 2, "f32"), ("all-reduce", 12, 1, 2, "bf16")]


def test_group_sizes():
  assert C.group_size("replica_groups=mesh['a'=2,'b'=4] {'b'}, x", 8) == 4
  assert C.group_size("replica_groups=mesh['a'=2,'b'=4] {'a','b'}", 8) == 8
  assert C.group_size("replica_groups=[4,2]<=[8]", 8) == 2
  assert C.group_size("replica_groups={{0,1,2},{3,4,5}}", 6) == 3
  assert C.group_size("replica_groups={}", 8) == 8


def test_tiny_siglip_step_is_at_the_fsdp_minimum(shapes_data_dir):
  """The real train step on ``{data: 1, fsdp: 8}``: every sharded parameter all-gathered
  once, its gradient reduce-scattered once, replicated parameters' gradients all-reduced,
  plus the sigmoid loss's gather of the [B, D] text embeddings -- and nothing else, with the
  config's own rules (the token table's rows over fsdp, the residual stream batch-sharded:
  docs/scaling.md, "Collective volume")."""
  res = C.analyse("configs/siglip_shapes.py:tiny",
                  [f"--config.input.data_dir={shapes_data_dir}"], 8)
  r = C.ratios(res)
  for kind in ("all-gather", "reduce-scatter", "all-reduce"):
    assert 0.95 <= r[kind] <= 1.05, (kind, r, C.top_ops(res))
  assert r["all-to-all"] is None and r["collective-permute"] is None
  assert res["param_min"]["all-gather"] == res["sharded_bytes"] > 0.98 * res["param_bytes"]
  assert res["loss_min"]["all-gather"] == 4 * 128 * 64  # ztxt [B=128, E=64] f32
