"""bench/profile_step.py's attribution of trace events to HLO instructions and jax ops."""
# ruff: noqa: E501

import collections

from bench.profile_step import by_op, hlo_index, op_names

# HLO text lines are long by nature
HLO = """\
%fused_computation.1 (p0: f32[8,4]) -> f32[4,8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %copy.1 = f32[4,8]{1,0} copy(%p0)
}

ENTRY %main (a: f32[8,4], b: f32[4,4]) -> f32[8,4] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %t1 = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/tower/block3/attn/transpose"}
  %t2 = f32[4,8]{1,0} fusion(%a), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/tower/block11/attn/transpose"}
  %d = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/tower/block3/mlp/dot_general"}
  ROOT %n = f32[8,4]{1,0} negate(%d)
}
"""


def test_ops_fold_layers_and_leave_the_dots_out():
  index = hlo_index(HLO)
  assert index["t1"] == ("fusion:copy", "f32[4,8]") and index["d"][0] == "dot"
  ops = op_names(HLO)
  assert ops["t1"] == ops["t2"] == "tower/blockN/attn/transpose"
  assert "n" not in ops  # no metadata
  ms = collections.Counter({"t1": 2.0, "t2": 3.0, "d": 50.0, "n": 1.0})
  assert by_op(ms, index, ops) == {
      ("fusion:copy", "f32[4,8]", "tower/blockN/attn/transpose"): 5.0,
      ("negate", "f32[8,4]", "?"): 1.0}
