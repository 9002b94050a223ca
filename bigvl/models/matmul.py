"""bf16 matmuls with float32 accumulation, laid out the way XLA:CPU runs them natively.

``model.dtype = 'bfloat16'`` in the transformer towers means: every matmul reads bfloat16
copies of its operands and accumulates and returns float32; parameters, optimizer state and
the activations between matmuls (LayerNorm, GELU, softmax, residuals) stay float32. Forward
``y = bf16(x) @ bf16(W)`` (f32 out); backward ``dx = bf16(g) @ bf16(W)^T``, ``dW = bf16(x)^T
@ bf16(g)`` (f32 out) -- the bf16 rounding of autocast / TPU default precision, applied to
the backward matmuls too.

Why a module of its own: XLA:CPU (jaxlib 0.10) runs a bf16 dot natively (YNNPACK/oneDNN,
~2-4x its f32 speed on a CPU with avx512_bf16) only for a row-major ``[..., M, K] x [..., K,
N]`` or ``[M, K] x [N, K]`` with a float32 result; any other layout (the ``x^T @ g`` of a
weight gradient, ``q k^T`` of attention, a bf16 result) is silently upcast to an f32 dot on
rounded inputs, and a bare ``transpose`` feeding a dot is folded back into its dimension
numbers. :func:`matmul` therefore moves operands into the native layout with
:func:`materialize_t`, a transpose written as a reshape-transpose-reshape that XLA keeps as a
physical copy (a copy of an operand costs far less than the upcast dot), in the forward and
in the hand-written backward (``jax.custom_vjp``).

``bench/profile_step.py`` shows the effect per instruction; ``tests/models/test_matmul.py``
checks values and gradients against ``jnp.dot`` on the same bf16-rounded operands.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

BF16 = jnp.bfloat16


def materialize(x: jax.Array, perm: Sequence[int]) -> jax.Array:
  """``jnp.transpose(x, perm)`` as a physical copy (a size-1 axis rides along in the
  middle, so XLA cannot fold the transpose into the consuming dot's dimension numbers)."""
  y = jnp.transpose(x.reshape(*x.shape, 1), (perm[0], x.ndim, *perm[1:]))
  return y.reshape(tuple(x.shape[i] for i in perm))


def materialize_t(x: jax.Array) -> jax.Array:
  """``swapaxes(x, -1, -2)`` as a physical copy: ``[*b, M, K] -> [*b, K, M]``."""
  n = x.ndim
  return materialize(x, (*range(n - 2), n - 1, n - 2))


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  """``[*B, M, K] x [*B, K, N] -> f32 [*B, M, N]`` from bf16 operands (the native layout)."""
  n = a.ndim - 2
  dims = (((n + 1,), (n,)), (tuple(range(n)), tuple(range(n))))
  return jax.lax.dot_general(a.astype(BF16), b.astype(BF16), dims,
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b`` for ``a [*B, M, K]``, ``b [*B, K, N]`` (same batch dims): bf16 operands,
  float32 accumulation and result. Gradients are float32 in the operands' dtypes."""
  return _mm(a, b)


def _matmul_fwd(a, b):
  a16, b16 = a.astype(BF16), b.astype(BF16)
  return _mm(a16, b16), (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _matmul_bwd(res, g):
  a16, b16, adt, bdt = res
  g16 = g.astype(BF16)
  da = _mm(g16, materialize_t(b16))          # [M, N] x [N, K]
  db = _mm(materialize_t(a16), g16)          # [K, M] x [M, N]
  return da.astype(adt.dtype), db.astype(bdt.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
  """A ``lax.dot_general`` for ``nn.Dense`` / ``nn.DenseGeneral`` (``dot_general=``): the
  trailing contracting dims of ``lhs`` against the leading ones of ``rhs``, no batch dims,
  through :func:`matmul` on 2-D views. Anything else -> ValueError."""
  del precision, preferred_element_type
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(lc), tuple(rc)
  nc = len(lc)
  if lb or rb or lc != tuple(range(lhs.ndim - nc, lhs.ndim)) or rc != tuple(range(nc)):
    raise ValueError(f"matmul.dot_general: unsupported dimension numbers {dimension_numbers}")
  out_lhs, contract, out_rhs = lhs.shape[:-nc], lhs.shape[-nc:], rhs.shape[nc:]
  k = _prod(contract)
  y = matmul(lhs.reshape(-1, k), rhs.reshape(k, -1))
  return y.reshape(*out_lhs, *out_rhs)


def _prod(xs: Sequence[int]) -> int:
  p = 1
  for x in xs:
    p *= x
  return p
