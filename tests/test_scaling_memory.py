"""bench/scaling_memory.py's analytic state bytes against XLA's memory analysis of the real
tiny SigLIP step compiled for abstract arrays: on ``{fsdp: 8}`` and on ``{data: 2, fsdp: 4}``
(state replicated over ``data``), the exact shard count equals XLA's argument bytes and the
FSDP formula ``sum_p P_p b_p (1 + m_p) / F + batch / (data fsdp)`` is within 10%."""

import jax
import pytest

from bench.lvlm_memory import load
from bench.scaling_memory import measure


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4)])
def test_analytic_state_bytes_match_xla_arguments(shapes_data_dir, data, fsdp):
  c = load("configs/siglip_shapes.py:tiny", shapes_data_dir,
           [f"mesh.data={data}", f"mesh.fsdp={fsdp}", "mesh.tensor=1"])
  r = measure(c, jax.devices()[:8])
  a, args = r["analytic"], r["xla"]["args"]
  assert r["mesh"] == {"data": data, "fsdp": fsdp, "tensor": 1}
  assert abs(a["shards"] - args) <= 0.01 * args, (a, r["xla"])
  assert abs(a["naive"] - args) <= 0.10 * args, (a, r["xla"])
  # the state is what shards: 3 copies (params, mu, nu) split F ways, plus the batch shard
  state = args - a["batch"]
  assert abs(state - 3 * a["params_total"] / fsdp) <= 0.10 * state
