"""Scaled dot-product attention with a hand-written backward pass, laid out for XLA:CPU.

``O = softmax(Q K^T / sqrt(d) + mask) V`` (Vaswani et al. 2017) over ``[B, L, H, d]`` inputs,
computed per head in ``[B, H, L, d]``. The backward pass is the one flash attention uses
(Dao et al. 2022, eq. in its appendix B.2), from the saved probabilities ``P`` and output
``O``::

    dP = dO V^T;   delta = rowsum(dO * O);   dS = P * (dP - delta)
    dQ = dS K / sqrt(d);   dK = dS^T Q';   dV = P^T dO        (Q' = Q / sqrt(d))

``rowsum(dO * O)`` equals autodiff's ``rowsum(dP * P)`` but reads ``[L, d]`` instead of
``[L, L]`` per head.

Why not autodiff of the einsums: on XLA:CPU (jaxlib 0.10) the transposed batched products
that autodiff emits for the ``[B, L, H, d]`` einsums of ``flax.linen.dot_product_attention``
(heads in the middle, contracting over a strided axis) ran the worst of them at ~16 GFLOP/s
(``bench/profile_step.py`` on the S16 step), against ~70 for the same products with the
heads next to the batch. Here every product has ``(B, H)`` as its leading batch dims, and the
four layout changes (``Q, K, V`` in, ``O`` out; their gradients back) are explicit copies:
one ViT-S layer, fwd + bwd, B=32, about half of flax's time (``python -m bench.attention``,
docs/benchmarks.md).

The products stay float32 on the towers' bf16 path too (``model.dtype=bfloat16`` makes
only the projections and MLP bf16): with ``d = 64`` they are too thin for bf16 operands to
pay for their casts and layout copies on XLA:CPU (slower than float32 when tried).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _to_heads(x: jax.Array) -> jax.Array:
  """``[B, L, H, d] -> [B, H, L, d]``."""
  return jnp.transpose(x, (0, 2, 1, 3))


def _bmm(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
  """A batched product in float32."""
  return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))


def _masked(s: jax.Array, mask: jax.Array | None) -> jax.Array:
  return s if mask is None else jnp.where(mask, s, jnp.finfo(s.dtype).min)


@jax.custom_vjp
def _attention(q, k, v, mask):
  return _forward(q, k, v, mask)[0]


def _forward(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  qh, kh, vh = _to_heads(q * scale), _to_heads(k), _to_heads(v)
  p = jax.nn.softmax(_masked(_bmm(qh, kh, "bhqd,bhkd->bhqk"), mask), axis=-1)
  o = _bmm(p, vh, "bhqk,bhkd->bhqd")
  return jnp.transpose(o, (0, 2, 1, 3)).astype(q.dtype), (qh, kh, vh, p, o, mask)


def _backward(res, g):
  qh, kh, vh, p, o, mask = res
  scale = qh.shape[-1] ** -0.5
  do = _to_heads(g).astype(jnp.float32)
  dp = _bmm(do, vh, "bhqd,bhkd->bhqk")
  ds = p * (dp - jnp.sum(do * o, axis=-1, keepdims=True))
  dq = _bmm(ds, kh, "bhqk,bhkd->bhqd") * scale
  dk = _bmm(ds, qh, "bhqk,bhqd->bhkd")
  dv = _bmm(p, do, "bhqk,bhqd->bhkd")
  back = lambda x, like: jnp.transpose(x, (0, 2, 1, 3)).astype(like.dtype)
  return back(dq, qh), back(dk, kh), back(dv, vh), None  # None: the mask has no gradient


_attention.defvjp(_forward, _backward)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """``softmax(q k^T / sqrt(d) + mask) v``: ``query [B, Lq, H, d]``, ``key``/``value [B, Lk,
  H, d]``, ``mask`` (True = attend) broadcastable to ``[B, H, Lq, Lk]`` -> ``[B, Lq, H, d]``
  in ``query``'s dtype."""
  return _attention(query, key, value, mask)


def attention_fn(query: jax.Array, key: jax.Array, value: jax.Array, bias=None, mask=None,
                 dropout_rate: float = 0.0, deterministic: bool = True, **_unused) -> jax.Array:
  """:func:`dot_product_attention` as an ``attention_fn`` of
  ``nn.MultiHeadDotProductAttention`` (no bias, no dropout: the towers use neither)."""
  if bias is not None:
    raise ValueError("bigvl.models.attention: attention bias is not supported")
  if dropout_rate and not deterministic:
    raise ValueError("bigvl.models.attention: attention dropout is not supported")
  return dot_product_attention(query, key, value, mask)
