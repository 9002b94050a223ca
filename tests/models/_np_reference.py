"""Plain numpy float64 building blocks of a pre-LN transformer, for checking the flax models
weight for weight (the flax parameter layout: Dense kernels ``[in, out]``, attention
``query/key/value`` kernels ``[D, H, Dh]``, ``out`` kernel ``[H, Dh, D]``)."""

import math

import flax.linen as nn
import jax
import numpy as np


def f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(tree))


def randomize(params, seed=0, scale=0.3):
  """The same tree with every leaf random (biases, LayerNorm scales included), so that a
  reference that ignores a bias or a scale cannot agree by accident."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  new = []
  for leaf in leaves:
    x = rng.normal(scale=scale, size=leaf.shape)
    new.append(np.asarray(x, np.float32))
  return jax.tree.unflatten(treedef, new)


def layer_norm(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def mlp(x, p):
  return dense(gelu_tanh(dense(x, p["fc1"])), p["fc2"])


def softmax(z, axis=-1):
  z = z - z.max(axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis, keepdims=True)


def mha(xq, xkv, p, mask=None):
  """Multi-head attention by explicit per-head loops. xq [B, Lq, D], xkv [B, Lk, D];
  mask [B, Lq, Lk] bool (True: may attend)."""
  b, lq, _ = xq.shape
  heads, dh = p["query"]["kernel"].shape[1:]
  out = np.zeros((b, lq, p["out"]["kernel"].shape[-1]))
  for n in range(b):
    for h in range(heads):
      q = xq[n] @ p["query"]["kernel"][:, h] + p["query"]["bias"][h]  # [Lq, Dh]
      k = xkv[n] @ p["key"]["kernel"][:, h] + p["key"]["bias"][h]
      v = xkv[n] @ p["value"]["kernel"][:, h] + p["value"]["bias"][h]
      logits = q @ k.T / math.sqrt(dh)
      if mask is not None:
        logits = np.where(mask[n], logits, -1e30)  # a fully masked row: uniform
      out[n] += softmax(logits) @ v @ p["out"]["kernel"][h]
  return out + p["out"]["bias"]


def encoder_block(x, p, mask=None):
  """``x + MHA(LN(x))`` then ``x + MLP(LN(x))``."""
  y = layer_norm(x, p["ln1"])
  x = x + mha(y, y, p["attn"], mask)
  return x + mlp(layer_norm(x, p["ln2"]), p["mlp"])


def encoder(x, p, depth, mask=None):
  for i in range(depth):
    x = encoder_block(x, p[f"block{i}"], mask)
  return layer_norm(x, p["ln_final"])
