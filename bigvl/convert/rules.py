"""The rule tables every converter is made of, and the one reader / writer that walks them.

A :class:`Rule` says where one parameter goes: our ``'/'``-joined path, the HF key (template),
the layout change both ways and whether a config has the parameter. ``{i}`` is the layer
index: in both names, the layers are separate leaves (ViT blocks); in the HF key only, our leaf
is the stack of the layers on axis 0 (``nn.scan``). :func:`entries` expands a table for one
config into ``(our path, HF key(s), rule)``; :func:`read` (import, every key and shape checked
before any tensor is read), :func:`write` (export) and :func:`source_fns` (the train loop's
pretrained init) take those. A family (``llama``, ``vision``, ``llava``) keeps only its table
and its config mapping.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from bigvl.config import ConfigError
from bigvl.convert import safetensors_io

#: ``(tensor, config) -> tensor``; the config is the family's (``LLMConfig``, ``ViT``, ...).
Convert = Callable[[np.ndarray, Any], np.ndarray]
#: HF key of a leaf, or the per-layer keys (layer order) of a stacked one.
Keys = str | list[str]
#: ``(our path, HF key(s), rule)``.
Entry = tuple[str, Keys, "Rule"]
ADAPTERS = ("lora_a", "lora_b")


# --- layout conversions: one HF tensor <-> one (per-layer) leaf of ours ----------------------

def same(w: np.ndarray, c: Any) -> np.ndarray:
  return w


def transpose(w: np.ndarray, c: Any) -> np.ndarray:
  """torch ``Linear`` ``[out, in]`` <-> ours ``[in, out]`` (its own inverse)."""
  return w.T


def _head_dim(c: Any) -> int:
  """``c.head_dim`` (``LLMConfig``) or ``width // num_heads`` (``ViT``)."""
  return getattr(c, "head_dim", None) or c.width // c.num_heads


def split_heads_in(w: np.ndarray, c: Any) -> np.ndarray:
  """q/k/v ``[n*hd, D] -> [D, n, hd]`` (``n`` = heads or kv heads)."""
  return w.T.reshape(w.shape[1], -1, _head_dim(c))


def merge_heads_in(k: np.ndarray, c: Any) -> np.ndarray:
  """``[D, n, hd] -> [n*hd, D]`` (inverse of :func:`split_heads_in`)."""
  return k.reshape(k.shape[0], -1).T


def split_heads_bias(b: np.ndarray, c: Any) -> np.ndarray:
  """``[n*hd] -> [n, hd]``."""
  return b.reshape(-1, _head_dim(c))


def merge_heads_bias(b: np.ndarray, c: Any) -> np.ndarray:
  return b.reshape(-1)


def split_heads_out(w: np.ndarray, c: Any) -> np.ndarray:
  """Output projection ``[D, H*hd] -> [H, hd, D]``."""
  return w.T.reshape(-1, _head_dim(c), w.shape[0])


def merge_heads_out(k: np.ndarray, c: Any) -> np.ndarray:
  """``[H, hd, D] -> [D, H*hd]`` (inverse of :func:`split_heads_out`)."""
  return k.reshape(-1, k.shape[-1]).T


def always(c: Any) -> bool:
  return True


@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter: ``ours`` (path) <-> ``hf`` (key template, ``{i}`` = layer). ``to_ours`` /
  ``to_hf`` convert one (per-layer) tensor and are each other's inverse. ``part = (j, n)``: ours
  is the ``j``-th of ``n`` equal axis-0 chunks of the HF tensor (packed q/k/v). ``when(config)``:
  whether the parameter exists for a config."""

  ours: str
  hf: str
  to_ours: Convert = same
  to_hf: Convert = same
  when: Callable[[Any], bool] = always
  part: tuple[int, int] | None = None

  def read(self, w: np.ndarray, c: Any) -> np.ndarray:
    """The HF tensor -> our (per-layer) leaf."""
    if self.part is not None:
      j, n = self.part
      w = np.split(w, n, axis=0)[j]
    return self.to_ours(w, c)

  def hf_shape(self, c: Any, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for one (per-layer) leaf of ``our_shape`` (the whole packed
    tensor for a part)."""
    shape = self.to_hf(np.broadcast_to(np.zeros((), np.float32), our_shape), c).shape
    if self.part is not None:
      shape = (shape[0] * self.part[1], *shape[1:])
    return tuple(shape)


def entries(table: Iterable[Rule], c: Any, depth: int,
            key: Callable[[str], str] = lambda k: k, every: bool = False) -> list[Entry]:
  """``[(our path, HF key(s), rule)]`` of the parameters ``c`` has (``every``: of all rules);
  ``key`` maps each HF key (e.g. adds a prefix)."""
  out: list[Entry] = []
  for r in table:
    if not (every or r.when(c)):
      continue
    if "{i}" in r.ours:
      out += [(r.ours.format(i=i), key(r.hf.format(i=i)), r) for i in range(depth)]
    elif "{i}" in r.hf:
      out.append((r.ours, [key(r.hf.format(i=i)) for i in range(depth)], r))
    else:
      out.append((r.ours, key(r.hf), r))
  return out


def key_list(keys: Keys) -> list[str]:
  return keys if isinstance(keys, list) else [keys]


# --- params ----------------------------------------------------------------------------------

def flatten(tree: Any) -> dict[str, Any]:
  """Nested dicts -> ``{'a/b/c': leaf}``."""
  return traverse_util.flatten_dict(tree, sep="/")


def nest(flat: dict[str, Any]) -> dict:
  """``{'a/b/c': leaf}`` -> nested dicts."""
  return traverse_util.unflatten_dict(flat, sep="/")


def bare_params(params: Any) -> Any:
  """Params unboxed, without a ``{'params': ...}`` wrapper."""
  params = nn.meta.unbox(params)
  return params["params"] if set(params) == {"params"} else params


def param_shapes(init: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of the ``params`` that ``init()`` makes (abstract: nothing computed)."""
  from bigvl.parallel import path_str

  abstract = nn.meta.unbox(jax.eval_shape(init))["params"]
  return {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}


def check_table(name: str, shapes: dict[str, tuple[int, ...]], todo: list[Entry]) -> None:
  """The entries cover exactly the (non-adapter) params: a bug in table ``name`` otherwise."""
  base = {p for p in shapes if p.rsplit("/", 1)[-1] not in ADAPTERS}
  covered = {ours for ours, _, _ in todo}
  if base != covered:
    raise AssertionError(f"{name} out of date: params without a rule "
                         f"{sorted(base - covered)}, rules without a param "
                         f"{sorted(covered - base)}")


# --- reading / writing -----------------------------------------------------------------------

def check_present(reader: safetensors_io.TensorReader, keys: Iterable[str], what: str) -> None:
  """ConfigError naming (the first 8 of) every key of ``keys`` not in the files."""
  missing = [k for k in dict.fromkeys(keys) if k not in reader.files]
  if missing:
    more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
    raise ConfigError(f"{what}: missing tensors {missing[:8]}{more} that its config.json "
                      f"implies")


def read(reader: safetensors_io.TensorReader, todo: list[Entry], c: Any,
         shapes: dict[str, tuple[int, ...]], what: str, under: str = "",
         sort_missing: bool = False) -> dict:
  """Our params (nested dicts of float32 numpy, ``{i}``-stacked leaves on axis 0) from the
  tensors of ``todo``. First ConfigError naming every missing key (``sort_missing``: sorted,
  else in table order), then one for the first tensor whose shape is not what ``shapes`` (our
  leaves') implies; only then is anything read. ``under``: our paths' prefix in messages."""
  keys = [k for _, ks, _ in todo for k in key_list(ks)]
  check_present(reader, sorted(keys) if sort_missing else keys, what)
  for ours, keys, rule in todo:
    shape = shapes[ours][1:] if isinstance(keys, list) else shapes[ours]
    want = rule.hf_shape(c, shape)
    for k in key_list(keys):
      got = reader.shape(k)
      if got != want:
        raise ConfigError(f"{what}: tensor {k!r} has shape {got} in "
                          f"{os.path.basename(reader.files[k])} but config.json implies "
                          f"{want} (for {under}{ours})")
  flat = {}
  for ours, keys, rule in todo:
    layers = [np.ascontiguousarray(rule.read(reader.get(k), c), dtype=np.float32)
              for k in key_list(keys)]
    flat[ours] = np.stack(layers) if isinstance(keys, list) else layers[0]
  return nest(flat)


def write(todo: list[Entry], params: Any, c: Any, what: str, under: str = ""
          ) -> dict[str, np.ndarray]:
  """``{HF key: tensor}`` of our ``params`` (stacked leaves split per layer, packed parts
  concatenated in order); ConfigError naming a leaf ``todo`` needs that params lack."""
  flat = flatten(jax.device_get(params))
  out: dict[str, np.ndarray] = {}
  parts: dict[str, dict[int, np.ndarray]] = {}
  for ours, keys, rule in todo:
    if ours not in flat:
      raise ConfigError(f"params have no {under + ours!r} (the {what} export needs it)")
    x = np.asarray(flat[ours])
    for j, k in enumerate(key_list(keys)):
      y = rule.to_hf(x[j] if isinstance(keys, list) else x, c)
      if rule.part is None:
        out[k] = y
      else:
        parts.setdefault(k, {})[rule.part[0]] = y
  for k, chunks in parts.items():
    out[k] = np.concatenate([chunks[j] for j in sorted(chunks)], axis=0)
  return out


def missing_unless_adapter(rel: str) -> str | None:
  """A ``key_fn`` fallback: LoRA adapters keep their init (None), any other leaf is looked up
  by its own path (and so reported missing)."""
  return None if rel.rsplit("/", 1)[-1] in ADAPTERS else rel


def source_fns(parts: Iterable[tuple[list[Entry], Any, str]],
               fallback: Callable[[str], str | None] = lambda rel: None
               ) -> tuple[Callable[[str], Keys | None], Callable[[str, np.ndarray], np.ndarray]]:
  """``(key_fn, convert)`` of a :class:`bigvl.checkpoint.WeightSource` over ``parts``: each
  ``(entries, config, under)``, the entries' paths sitting at ``under`` (``''``, ``'lm/'``)
  below the source's ``dst``. Paths in no table get ``fallback(rel)``."""
  table = {under + ours: (keys, rule, c) for todo, c, under in parts for ours, keys, rule in todo}

  def key_fn(rel: str) -> Keys | None:
    return table[rel][0] if rel in table else fallback(rel)

  def convert(rel: str, x: np.ndarray) -> np.ndarray:
    _, rule, c = table[rel]
    return rule.read(x, c)

  return key_fn, convert
