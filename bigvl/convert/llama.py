"""Llama and Qwen2 decoder checkpoints (``LlamaForCausalLM``, ``Qwen2ForCausalLM``) <->
:class:`bigvl.models.llm.LLM`.

The two families are the same network (``bigvl.models.llm``): Qwen2 adds q/k/v biases
(always), Llama has none (``attention_bias=True`` also biases ``o_proj``, which ``LLM`` has not:
refused). Both use the rotate-half RoPE layout that ``LLM`` uses, so no q/k permutation.

One table, :data:`RULES`, says where every parameter goes: our path, the HF key (``{i}`` =
layer index for the ``nn.scan``-stacked layers, leading axis = layer) and the layout change
both ways, e.g. for a query projection (torch ``Linear`` weights are ``[out, in]``)::

    ours [D, H, hd] = hf [H*hd, D]^T reshaped        hf = ours reshaped [D, H*hd], transposed

:func:`load` (import), :func:`save` (export) and :func:`weight_sources` (the train loop's
pretrained init, sharded and lazy) all read that table through :mod:`bigvl.convert.rules`;
nothing else knows the names. :func:`read_params` / :func:`hf_tensors` take a key mapping, so
a composite model (``bigvl.convert.llava``) reads and writes its decoder with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from bigvl.config import ConfigError
from bigvl.convert import rules, safetensors_io
from bigvl.convert.rules import Rule
from bigvl.models import lora as lora_lib
from bigvl.models.llm import LLM, LLMConfig

if TYPE_CHECKING:
  from bigvl.checkpoint import WeightSource

MODEL_TYPES = ("llama", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
#: rope types that are plain ``theta_i = rope_theta^(-2i/d)`` (what ``LLM`` implements).
PLAIN_ROPE = (None, "default")
#: transformers' ``LlamaConfig`` defaults, for a composite model's sparse ``text_config``.
LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                      intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)


# --- the table -------------------------------------------------------------------------------

def _layer(name: str) -> str:
  return f"model.layers.{{i}}.{name}"


def _qkv_bias(c: LLMConfig) -> bool:
  return c.qkv_bias


def _untied(c: LLMConfig) -> bool:
  return not c.tie_embeddings


#: The whole mapping (import, export and pretrained init all use it).
RULES: tuple[Rule, ...] = (
    Rule("embed/embedding", "model.embed_tokens.weight"),
    Rule("layers/input_norm/scale", _layer("input_layernorm.weight")),
    Rule("layers/post_attn_norm/scale", _layer("post_attention_layernorm.weight")),
    *(Rule(f"layers/attn/{p}/kernel", _layer(f"self_attn.{p}_proj.weight"),
           rules.split_heads_in, rules.merge_heads_in) for p in "qkv"),
    *(Rule(f"layers/attn/{p}/bias", _layer(f"self_attn.{p}_proj.bias"),
           rules.split_heads_bias, rules.merge_heads_bias, _qkv_bias) for p in "qkv"),
    Rule("layers/attn/o/kernel", _layer("self_attn.o_proj.weight"),
         rules.split_heads_out, rules.merge_heads_out),
    *(Rule(f"layers/mlp/{p}/kernel", _layer(f"mlp.{p}_proj.weight"), rules.transpose,
           rules.transpose) for p in ("gate", "up", "down")),
    Rule("final_norm/scale", "model.norm.weight"),
    Rule("lm_head/kernel", "lm_head.weight", rules.transpose, rules.transpose, _untied),
)


def entries(c: LLMConfig, key: Callable[[str], str] = lambda k: k, every: bool = False
            ) -> list[rules.Entry]:
  """``[(our path, HF key or per-layer keys, rule)]`` of the parameters ``c`` has (``every``:
  of all rules); ``key`` maps the ``LlamaForCausalLM`` keys (e.g. to a composite model's)."""
  return rules.entries(RULES, c, c.depth, key, every)


# --- configs ---------------------------------------------------------------------------------

def _rope_theta(cfg: dict, what: str) -> float:
  """``rope_theta`` from a config of transformers 4 (top-level ``rope_theta`` +
  ``rope_scaling``) or 5 (``rope_parameters = {rope_type, rope_theta, ...}``); ConfigError for
  any rope scaling (linear, dynamic, yarn, llama3, ...) or partial rotary."""
  theta = cfg.get("rope_theta")
  for field in ("rope_parameters", "rope_scaling"):
    p = cfg.get(field)
    if p is None:
      continue
    if not isinstance(p, dict):
      raise ConfigError(f"{what}: {field}={p!r} is not a dict")
    kind = p.get("rope_type", p.get("type"))
    if kind not in PLAIN_ROPE:
      raise ConfigError(f"{what}: {field}.rope_type={kind!r} is not supported; bigvl's LLM "
                        f"implements only plain RoPE (rope_type 'default')")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConfigError(f"{what}: partial_rotary_factor={p['partial_rotary_factor']} is not "
                        f"supported")
    if p.get("rope_theta") is not None:
      if theta is not None and float(theta) != float(p["rope_theta"]):
        raise ConfigError(f"{what}: rope_theta={theta} and {field}.rope_theta="
                          f"{p['rope_theta']} disagree")
      theta = p["rope_theta"]
  return float(10000.0 if theta is None else theta)


def config_from_hf(cfg: dict) -> LLMConfig:
  """A transformers ``LlamaConfig``/``Qwen2Config`` dict (``config.json``) -> ``LLMConfig``.

  ``head_dim`` defaults to ``hidden_size // num_attention_heads``; ``num_key_value_heads`` to
  ``num_attention_heads``. Parameters stay float32 whatever ``torch_dtype``/``dtype`` says.
  ConfigError for what ``LLM`` cannot compute exactly: rope scaling, ``hidden_act`` other than
  silu, ``mlp_bias``, Llama's ``attention_bias`` (it biases ``o_proj`` too), Qwen2's sliding
  window.
  """
  model_type = cfg.get("model_type")
  what = f"config.json (model_type={model_type!r})"
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"{what}: not one of {MODEL_TYPES}")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                         "num_hidden_layers", "num_attention_heads") if k not in cfg]
  if missing:
    raise ConfigError(f"{what}: missing keys {missing}")
  act = cfg.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ConfigError(f"{what}: hidden_act={act!r}; bigvl's LLM uses SwiGLU (silu) only")
  if cfg.get("mlp_bias", False):
    raise ConfigError(f"{what}: mlp_bias=True is not supported (bigvl's LLM has no MLP "
                      f"biases)")
  if model_type == "llama" and cfg.get("attention_bias", False):
    raise ConfigError(f"{what}: attention_bias=True is not supported for llama (it adds an "
                      f"o_proj bias, which bigvl's LLM has not)")
  if model_type == "qwen2" and cfg.get("use_sliding_window", False):
    raise ConfigError(f"{what}: use_sliding_window=True is not supported (bigvl's LLM "
                      f"attends to the whole context)")
  heads = int(cfg["num_attention_heads"])
  hidden = int(cfg["hidden_size"])
  head_dim = cfg.get("head_dim") or hidden // heads
  rope_theta = _rope_theta(cfg, what)  # its ConfigErrors name `what` already
  try:
    return LLMConfig(
        vocab_size=int(cfg["vocab_size"]), width=hidden, depth=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim), mlp_dim=int(cfg["intermediate_size"]),
        rope_theta=rope_theta, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))
  except ValueError as e:
    raise ConfigError(f"{what}: {e}") from None


def text_config(cfg: dict | None) -> dict:
  """A composite model's ``text_config`` (e.g. LLaVA's) as a full ``config.json`` dict: its
  ``None`` values dropped, transformers' ``LlamaConfig`` defaults (:data:`LLAMA_DEFAULTS`)
  for the keys it leaves out, as sparse llava-hf configs rely on."""
  return {**LLAMA_DEFAULTS, **{k: v for k, v in (cfg or {}).items() if v is not None}}


def config_to_hf(c: LLMConfig, model_type: str = "llama", *, dtype: str = "float32",
                 max_position_embeddings: int = 32768) -> dict:
  """``LLMConfig`` -> a ``config.json`` dict that transformers 4 and 5 read as
  ``LlamaForCausalLM``/``Qwen2ForCausalLM`` (``rope_theta`` at the top level and in
  ``rope_parameters``). ``max_position_embeddings``: ``LLM`` has no limit; written for HF."""
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"model_type={model_type!r}: not one of {MODEL_TYPES}")
  if model_type == "llama" and c.qkv_bias:
    raise ConfigError("qkv_bias=True cannot be written as llama (its attention_bias also "
                      "biases o_proj): export as model_type='qwen2'")
  out = {
      "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": c.vocab_size, "hidden_size": c.width, "intermediate_size": c.mlp_dim,
      "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
      "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
      "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
      "tie_word_embeddings": c.tie_embeddings,
      "max_position_embeddings": max_position_embeddings, "initializer_range": 0.02,
      "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
  }
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0)
  else:
    out.update(use_sliding_window=False, attention_dropout=0.0,
               max_window_layers=c.depth)
  return out


# --- shapes ----------------------------------------------------------------------------------

def param_shapes(c: LLMConfig) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of ``LLM(c)``'s params (abstract: nothing is computed)."""
  return rules.param_shapes(lambda: LLM(c).init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 1), jnp.int32)))


# --- import / export / pretrained init -------------------------------------------------------

def read_params(reader: safetensors_io.TensorReader, c: LLMConfig,
                key: Callable[[str], str] = lambda k: k, what: str = "checkpoint",
                under: str = "") -> dict:
  """``LLM(c)``'s params (nested dicts of float32 numpy, layers stacked on axis 0) from the
  tensors ``key(k)`` of the ``LlamaForCausalLM`` keys ``k``. Every key is checked (names of
  all missing ones) and every shape before any tensor is read; ``what`` (the directory) and
  ``under`` (our params' path, e.g. ``'lm/'``) name them in errors."""
  shapes = param_shapes(c)
  rules.check_table("llama.RULES", shapes, entries(c))
  return rules.read(reader, entries(c, key), c, shapes, what, under)


def hf_tensors(c: LLMConfig, params: Any, key: Callable[[str], str] = lambda k: k,
               what: str = "llama", under: str = "") -> dict[str, np.ndarray]:
  """``{key(HF key): tensor}`` of ``LLM(c)``'s ``params`` (per layer; the params' dtype)."""
  return rules.write(entries(c, key), params, c, what, under)


def load(directory: str, hf_config: dict | None = None, **overrides: Any
         ) -> tuple[LLM, dict]:
  """A Llama/Qwen2 checkpoint directory -> ``(LLM, params)``; params are nested dicts of
  float32 host (numpy) arrays, layers stacked on axis 0 as ``nn.scan`` has them.

  ``overrides``: ``LLMConfig`` fields that leave the parameters alone (``dtype``, ``remat``).
  Every tensor is checked (names of all missing keys, shapes) before any is read; each is
  read once, lazily, from the memory-mapped files.
  """
  hf_config = safetensors_io.read_config(directory) if hf_config is None else hf_config
  c = dataclasses.replace(config_from_hf(hf_config), **overrides)
  with safetensors_io.TensorReader(safetensors_io.key_files(directory)) as reader:
    return LLM(c), read_params(reader, c, what=directory)


def default_model_type(c: LLMConfig) -> str:
  """``qwen2`` for q/k/v biases, else ``llama``."""
  return "qwen2" if c.qkv_bias else "llama"


def export_type(model: Any) -> str | None:
  """The model_type an ``LLM`` is exported as by default; None for other models."""
  return default_model_type(model.config) if isinstance(model, LLM) else None


def save(directory: str, model: LLM, params: Any, model_type: str | None = None,
         max_shard_bytes: int | None = None) -> None:
  """Writes ``config.json`` + ``model.safetensors`` (or shards) that
  ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads.

  LoRA adapters are merged first (``W + (alpha/r) A B``, :func:`bigvl.models.lora.merge`).
  Tensors keep the params' dtype. A qwen2 export of a model without q/k/v biases writes zero
  biases (Qwen2 always has them). Params must be fully addressable (one host).
  """
  c = model.config
  model_type = model_type or default_model_type(c)
  flat = rules.flatten(jax.device_get(lora_lib.merge(rules.bare_params(params), c.lora)))
  if model_type == "qwen2" and not c.qkv_bias:
    c = dataclasses.replace(c, qkv_bias=True)
    for p in "qkv":
      k = flat[f"layers/attn/{p}/kernel"]
      flat[f"layers/attn/{p}/bias"] = np.zeros(k.shape[:1] + k.shape[2:], k.dtype)
  dtype = np.dtype(flat["embed/embedding"].dtype).name
  hf_config = config_to_hf(c, model_type, dtype=dtype)
  tensors = hf_tensors(c, rules.nest(flat), what=model_type)
  safetensors_io.save(directory, tensors, hf_config, max_shard_bytes)


def weight_sources(directory: str, dst: str = "params", hf_config: dict | None = None,
                   what: str = "weights") -> list[WeightSource]:
  """``[WeightSource]`` reading this checkpoint into the ``LLM`` below ``dst`` of a train
  state, each leaf straight into its shards, stacked layers one layer at a time.

  Leaves the table knows are mapped (also ``lm_head`` when a tied checkpoint stores it);
  LoRA adapters (``lora_a``/``lora_b``) are not in the checkpoint and keep their init; any
  other leaf is reported missing by the reader.
  """
  from bigvl.checkpoint import WeightSource

  hf_config = safetensors_io.read_config(directory) if hf_config is None else hf_config
  c = config_from_hf(hf_config)
  key_fn, convert = rules.source_fns([(entries(c, every=True), c, "")],
                                     rules.missing_unless_adapter)
  return [WeightSource(path=directory, dst=dst, key_fn=key_fn, convert=convert, what=what)]
