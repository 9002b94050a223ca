"""Per-device temporary memory of the dense vs ring sigmoid loss (value_and_grad), compiled only.

Usage: python bench/ring_memory.py [--batches 1024 4096 16384] [--dim 256] [--devices 8]
                                   [--local-batch 512]

Both run inside ``jax.shard_map`` over a 'data' mesh axis on simulated CPU devices:
* dense: ``all_gather`` the texts, then ``sigmoid_loss`` of the local images against all of them
  (an [n, B] logits block per device), partial losses ``psum``-ed;
* ring: ``ring_sigmoid_loss`` (text blocks passed around with ``ppermute``, [n, n] chunks).
Nothing is executed: the numbers are XLA's ``memory_analysis().temp_size_in_bytes`` of the
compiled (per-device, SPMD-partitioned) program.

Table 1: global batch B on all ``--devices`` devices (the local batch n = B/p grows with B).
Table 2: fixed local batch ``--local-batch`` on 2, 4, ... ``--devices`` devices (B = p n grows
with the number of devices): ring memory stays flat, dense grows with B.
"""

import argparse
import os
import sys


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384])
  ap.add_argument("--dim", type=int, default=256)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--local-batch", type=int, default=512)
  args = ap.parse_args()

  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  from bigvl.losses.contrastive import ring_sigmoid_loss, sigmoid_loss

  def dense_local(zi, zt, t, b):
    n = zi.shape[0]
    all_txt = jax.lax.all_gather(zt, "data", tiled=True)  # [B, D]
    me = jax.lax.axis_index("data")
    pos = jnp.arange(all_txt.shape[0])[None, :] == (me * n + jnp.arange(n))[:, None]
    # sigmoid_loss divides by the local n; the global loss divides by B = p n.
    p = jax.lax.axis_size("data")
    return jax.lax.psum(sigmoid_loss(zi, all_txt, t, b, positives=pos) / p, "data")

  def ring_local(zi, zt, t, b):
    return ring_sigmoid_loss(zi, zt, t, b, axis_name="data")

  def temp_bytes(local, batch, p):
    mesh = jax.make_mesh((p,), ("data",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:p])
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data"), P(), P()),
                       out_specs=P())
    vg = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
    emb = jax.ShapeDtypeStruct((batch, args.dim), jnp.float32,
                               sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    return vg.lower(emb, emb, scalar, scalar).compile().memory_analysis().temp_size_in_bytes

  mib = lambda x: f"{x / 2**20:.2f}"
  def row(batch, p):
    n = batch // p
    dense, ring = temp_bytes(dense_local, batch, p), temp_bytes(ring_local, batch, p)
    print(f"| {p} | {batch} | {n} | {mib(dense)} | {mib(ring)} | {dense / ring:.1f}x "
          f"| {mib(4 * n * batch)} | {mib(4 * n * n)} |", flush=True)

  header = ("| devices p | global B | local n = B/p | dense temp | ring temp | dense / ring "
            "| [n, B] f32 block | [n, n] f32 chunk |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
  p = args.devices
  print(f"Simulated devices ({jax.default_backend()}), embedding dim {args.dim}, float32, "
        "identity positives, value_and_grad w.r.t. (zimg, ztxt, t, b).\n"
        "Temp bytes per device, MiB.\n")
  print(f"### Global batch B on {p} devices\n\n{header}")
  for batch in args.batches:
    row(batch, p)
  print(f"\n### Fixed local batch n = {args.local_batch}, growing number of devices\n\n{header}")
  q = 2
  while q <= p:
    row(args.local_batch * q, q)
    q *= 2


if __name__ == "__main__":
  main()
