"""CLIP and SigLIP vision towers (``CLIPVisionModel``, ``SiglipVisionModel``, and the vision
half of full ``clip`` / ``siglip`` checkpoints) <-> :class:`bigvl.models.vit.ViT`.

The towers are the ViT with options (``bigvl.models.vit``):

* CLIP (Radford et al. 2021): CLS token, no patch bias, ``pre_layrnorm``, quick GELU
  (``x sigmoid(1.702 x)``), LayerNorm eps 1e-5, pooled = ``post_layernorm(h[:, 0])``
  (``pool='tok'``: our final LN is ``post_layernorm``).
* SigLIP (Zhai et al. 2023): patch bias, no CLS, tanh GELU, eps 1e-6; ``post_layernorm`` on
  every token, pooled = the MAP head (``pool='map'``; ``'none'`` without ``vision_use_head``).

HF outputs in ours: ``hidden_states[k]`` = ``apply(..., feature_layer=k)``; ``pooler_output``
= our pooled; ``last_hidden_state`` = our tokens for SigLIP, ``feature_layer=-1`` for CLIP
(HF applies ``post_layernorm`` to the CLS token only; see :func:`hf_outputs`).

One table, :data:`RULES`, maps every parameter: our path <-> HF key (below the tower's prefix;
``{i}`` = block index on both sides) and the layout change both ways. torch ``Linear`` is
``[out, in]``, ours ``[in, out]``; attention kernels are per head::

    q/k/v   ours [D, H, hd] = hf [H*hd, D]^T reshaped       out  ours [H, hd, D] = hf [D, H*hd]^T
    patch   ours [p, p, C, D] = hf [D, C, p, p] transposed (2, 3, 1, 0)

The SigLIP MAP head's ``nn.MultiheadAttention`` packs q/k/v in one ``in_proj_weight [3D, D]``:
its rules take ``part`` ``(j, 3)``, the ``j``-th third along axis 0. Import, export, the
LLaVA converter (``bigvl.convert.llava``, with a key prefix) and the train loop's pretrained
init all read this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigvl.config import ConfigError
from bigvl.convert import rules, safetensors_io
from bigvl.convert.rules import Rule
from bigvl.models.vit import ViT

CLIP_TYPES = ("clip_vision_model", "clip")
SIGLIP_TYPES = ("siglip_vision_model", "siglip")
MODEL_TYPES = CLIP_TYPES + SIGLIP_TYPES
ARCHITECTURES = {"clip_vision_model": "CLIPVisionModel",
                 "siglip_vision_model": "SiglipVisionModel"}
#: HF ``hidden_act`` -> our ``activation`` (``gelu_new``/``gelu_fast`` are the tanh form too).
ACT_FROM_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu_exact", "gelu_pytorch_tanh": "gelu",
               "gelu_new": "gelu", "gelu_fast": "gelu"}
ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu_exact": "gelu", "gelu": "gelu_pytorch_tanh"}
#: transformers' config defaults (a config.json may leave keys out).
HF_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
}
#: where a tower's keys start, by the checkpoint's model_type; import tries each in turn
#: (transformers 5 writes a standalone tower without ``vision_model.``, older ones with it).
PREFIXES = {"clip_vision_model": ("", "vision_model."), "clip": ("vision_model.",),
            "siglip_vision_model": ("", "vision_model."), "siglip": ("vision_model.",)}
#: the prefix exports write (what the public checkpoints have; transformers 4 and 5 load it).
EXPORT_PREFIX = "vision_model."


# --- layout conversions: one HF tensor <-> one leaf of ours ----------------------------------

def _conv_to_ours(w: np.ndarray, m: ViT) -> np.ndarray:
  """Conv2d ``[D, C, p, p]`` -> flax ``[p, p, C, D]``."""
  return w.transpose(2, 3, 1, 0)


def _conv_to_hf(k: np.ndarray, m: ViT) -> np.ndarray:
  return k.transpose(3, 2, 0, 1)


def _batch1(w: np.ndarray, m: ViT) -> np.ndarray:
  """``[..., D] -> [1, ..., D]`` up to ``[1, 1, D]`` (CLS ``[D]``, positions ``[N, D]``)."""
  return w.reshape((1,) * (3 - w.ndim) + w.shape)


def _unbatch_cls(x: np.ndarray, m: ViT) -> np.ndarray:
  return x.reshape(x.shape[-1])


def _unbatch_pos(x: np.ndarray, m: ViT) -> np.ndarray:
  return x.reshape(x.shape[-2:])


def _norm(ours: str, hf: str, when: Callable[[ViT], bool] = rules.always) -> list[Rule]:
  return [Rule(f"{ours}/scale", f"{hf}.weight", when=when),
          Rule(f"{ours}/bias", f"{hf}.bias", when=when)]


def _linear(ours: str, hf: str, when: Callable[[ViT], bool] = rules.always) -> list[Rule]:
  return [Rule(f"{ours}/kernel", f"{hf}.weight", rules.transpose, rules.transpose, when),
          Rule(f"{ours}/bias", f"{hf}.bias", when=when)]


def _attention(ours: str, hf: str) -> list[Rule]:
  """Separate ``{q,k,v,out}_proj`` (the encoder layers)."""
  out = []
  for name, p in (("query", "q"), ("key", "k"), ("value", "v")):
    out += [Rule(f"{ours}/{name}/kernel", f"{hf}.{p}_proj.weight", rules.split_heads_in,
                 rules.merge_heads_in),
            Rule(f"{ours}/{name}/bias", f"{hf}.{p}_proj.bias", rules.split_heads_bias,
                 rules.merge_heads_bias)]
  return out + [Rule(f"{ours}/out/kernel", f"{hf}.out_proj.weight", rules.split_heads_out,
                     rules.merge_heads_out),
                Rule(f"{ours}/out/bias", f"{hf}.out_proj.bias")]


def _has_map(m: ViT) -> bool:
  return m.pool == "map"


def _packed_attention(ours: str, hf: str) -> list[Rule]:
  """``nn.MultiheadAttention``: ``in_proj_weight [3D, D]`` / ``in_proj_bias [3D]`` = q, k, v
  stacked on axis 0 (the SigLIP MAP head)."""
  out = []
  for j, name in enumerate(("query", "key", "value")):
    out += [Rule(f"{ours}/{name}/kernel", f"{hf}.in_proj_weight", rules.split_heads_in,
                 rules.merge_heads_in, _has_map, (j, 3)),
            Rule(f"{ours}/{name}/bias", f"{hf}.in_proj_bias", rules.split_heads_bias,
                 rules.merge_heads_bias, _has_map, (j, 3))]
  return out + [Rule(f"{ours}/out/kernel", f"{hf}.out_proj.weight", rules.split_heads_out,
                     rules.merge_heads_out, _has_map),
                Rule(f"{ours}/out/bias", f"{hf}.out_proj.bias", when=_has_map)]


_BLOCK = "encoder/block{i}"
_LAYER = "encoder.layers.{i}"

#: The whole mapping (import, export, LLaVA and pretrained init all use it).
RULES: tuple[Rule, ...] = (
    Rule("embedding/kernel", "embeddings.patch_embedding.weight", _conv_to_ours, _conv_to_hf),
    Rule("embedding/bias", "embeddings.patch_embedding.bias", when=lambda m: m.patch_bias),
    Rule("cls", "embeddings.class_embedding", _batch1, _unbatch_cls, lambda m: m.has_cls),
    Rule("pos_embedding", "embeddings.position_embedding.weight", _batch1, _unbatch_pos),
    *_norm("pre_ln", "pre_layrnorm", lambda m: m.pre_norm),
    *_norm(f"{_BLOCK}/ln1", f"{_LAYER}.layer_norm1"),
    *_attention(f"{_BLOCK}/attn", f"{_LAYER}.self_attn"),
    *_norm(f"{_BLOCK}/ln2", f"{_LAYER}.layer_norm2"),
    *_linear(f"{_BLOCK}/mlp/fc1", f"{_LAYER}.mlp.fc1"),
    *_linear(f"{_BLOCK}/mlp/fc2", f"{_LAYER}.mlp.fc2"),
    *_norm("encoder/ln_final", "post_layernorm"),
    Rule("map_head/probe", "head.probe", when=_has_map),
    *_packed_attention("map_head/attn", "head.attention"),
    *_norm("map_head/ln", "head.layernorm", _has_map),
    *_linear("map_head/mlp/fc1", "head.mlp.fc1", _has_map),
    *_linear("map_head/mlp/fc2", "head.mlp.fc2", _has_map),
)


def entries(m: ViT, prefix: str = "") -> list[rules.Entry]:
  """``[(our path, HF key with prefix, rule)]`` of every parameter ``m`` has."""
  return rules.entries(RULES, m, m.depth, lambda k: prefix + k)


# --- configs ---------------------------------------------------------------------------------

def family(model_type: str) -> str:
  """``'clip'`` or ``'siglip'``; ConfigError for other model types."""
  if model_type in CLIP_TYPES:
    return "clip"
  if model_type in SIGLIP_TYPES:
    return "siglip"
  raise ConfigError(f"model_type={model_type!r} is not a CLIP/SigLIP vision tower "
                    f"({MODEL_TYPES})")


def vision_config(cfg: dict) -> tuple[str, dict]:
  """``(family, vision config dict with HF defaults filled in)`` of a tower's
  ``config.json`` or a full ``clip``/``siglip`` one (its ``vision_config``)."""
  model_type = cfg.get("model_type")
  fam = family(model_type)
  if model_type in ("clip", "siglip"):
    cfg = cfg.get("vision_config") or {}
  return fam, {**HF_DEFAULTS[fam], **{k: v for k, v in cfg.items() if v is not None}}


def config_from_hf(cfg: dict, **overrides: Any) -> tuple[ViT, int]:
  """A CLIP/SigLIP (vision) ``config.json`` dict -> ``(ViT, image_size)``. ``overrides``: ViT
  fields that leave the parameters alone (``dtype``, ``remat``). ConfigError for an unknown
  ``hidden_act`` or an image size the patches do not tile."""
  fam, v = vision_config(cfg)
  what = f"config.json (model_type={cfg.get('model_type')!r})"
  act = v["hidden_act"]
  if act not in ACT_FROM_HF:
    raise ConfigError(f"{what}: hidden_act={act!r} is not supported; known: "
                      f"{sorted(ACT_FROM_HF)}")
  size, patch = int(v["image_size"]), int(v["patch_size"])
  if size % patch:
    raise ConfigError(f"{what}: image_size={size} is not a multiple of patch_size={patch}")
  width, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
  if width % heads:
    raise ConfigError(f"{what}: num_attention_heads={heads} does not divide hidden_size="
                      f"{width}")
  clip = fam == "clip"
  fields = dict(patch_size=patch, width=width, depth=int(v["num_hidden_layers"]),
                num_heads=heads, mlp_dim=int(v["intermediate_size"]),
                pool="tok" if clip else ("map" if v.get("vision_use_head", True) else "none"),
                activation=ACT_FROM_HF[act], norm_eps=float(v["layer_norm_eps"]),
                patch_bias=not clip, pre_norm=clip)
  unknown = set(overrides) - set(ViT.__dataclass_fields__)
  if unknown:
    raise ConfigError(f"unknown ViT fields {sorted(unknown)}")
  return ViT(**{**fields, **overrides}), size


def export_type(model: Any) -> str | None:
  """``clip_vision_model`` for a CLIP-shaped ViT, ``siglip_vision_model`` for a SigLIP-shaped
  one, None otherwise (other models, or a ViT neither tower can hold)."""
  if not isinstance(model, ViT):
    return None
  for model_type in ARCHITECTURES:
    if not _mismatch(model, model_type):
      return model_type
  return None


def _mismatch(m: ViT, model_type: str) -> list[str]:
  """What keeps ``m`` from being written as ``model_type`` (empty: nothing)."""
  clip = family(model_type) == "clip"
  want = dict(patch_bias=not clip, pre_norm=clip)
  out = [f"{k}={getattr(m, k)!r} (needs {v!r})" for k, v in want.items() if getattr(m, k) != v]
  pools = ("tok",) if clip else ("map", "none")
  if m.pool not in pools:
    out.append(f"pool={m.pool!r} (needs one of {pools})")
  if m.activation not in ACT_TO_HF:
    out.append(f"activation={m.activation!r}")
  return out


def config_to_hf(m: ViT, image_size: int, model_type: str, *, num_channels: int = 3,
                 dtype: str = "float32") -> dict:
  """``ViT`` -> a ``CLIPVisionConfig``/``SiglipVisionConfig`` dict (``model_type``
  ``clip_vision_model`` / ``siglip_vision_model``)."""
  if model_type not in ARCHITECTURES:
    raise ConfigError(f"model_type={model_type!r}: a tower is written as one of "
                      f"{sorted(ARCHITECTURES)}")
  bad = _mismatch(m, model_type)
  if bad:
    raise ConfigError(f"this ViT cannot be written as {model_type}: {', '.join(bad)}")
  out = {"architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
         "hidden_size": m.width, "intermediate_size": m.mlp_dim,
         "num_hidden_layers": m.depth, "num_attention_heads": m.num_heads,
         "num_channels": num_channels, "image_size": image_size, "patch_size": m.patch_size,
         "hidden_act": ACT_TO_HF[m.activation], "layer_norm_eps": m.norm_eps,
         "attention_dropout": 0.0, "dtype": dtype, "torch_dtype": dtype}
  if family(model_type) == "clip":
    out.update(initializer_range=0.02, initializer_factor=1.0, projection_dim=512)
  else:
    out.update(vision_use_head=m.pool == "map")
  return out


# --- reading / writing -----------------------------------------------------------------------

def param_shapes(m: ViT, image_size: int, num_channels: int = 3) -> dict[str, tuple[int, ...]]:
  """``{path: shape}`` of ``m``'s params for ``image_size``^2 images (abstract)."""
  images = jnp.zeros((1, image_size, image_size, num_channels), jnp.float32)
  return rules.param_shapes(lambda: m.init(jax.random.PRNGKey(0), images))


def find_prefix(keys: Iterable[str], candidates: Iterable[str], probe: str, what: str) -> str:
  """The first candidate prefix ``p`` with ``p + probe`` in ``keys``; ConfigError if none."""
  keys = set(keys)
  candidates = tuple(candidates)
  for p in candidates:
    if p + probe in keys:
      return p
  raise ConfigError(f"{what}: no tensor {probe!r} under any of the prefixes {candidates}")


def read_params(reader: safetensors_io.TensorReader, m: ViT, image_size: int, prefix: str,
                what: str, num_channels: int = 3) -> dict:
  """Our ViT params (nested dicts of float32 numpy) from the tensors under ``prefix``. Checks
  every key is there (all missing ones named) and every shape before reading any."""
  shapes = param_shapes(m, image_size, num_channels)
  rules.check_table("vision.RULES", shapes, entries(m))
  return rules.read(reader, entries(m, prefix), m, shapes, what, sort_missing=True)


def hf_tensors(m: ViT, params: Any, prefix: str) -> dict[str, np.ndarray]:
  """``{HF key: tensor}`` of our params (packed parts concatenated in order)."""
  return rules.write(entries(m, prefix), nn.meta.unbox(params), m, "vision tower")


def image_size_of(m: ViT, params: Any) -> int:
  """The image side ``params``' position embedding is for (square images)."""
  pos = nn.meta.unbox(params)["pos_embedding"]
  n = pos.shape[1] - int(m.has_cls)
  side = math.isqrt(n)
  if side * side != n:
    raise ConfigError(f"pos_embedding has {n} patch positions: not a square grid")
  return side * m.patch_size


def load(directory: str, hf_config: dict | None = None, **overrides: Any) -> tuple[ViT, dict]:
  """A CLIP/SigLIP (vision) checkpoint directory -> ``(ViT, params)`` (float32 numpy)."""
  hf_config = safetensors_io.read_config(directory) if hf_config is None else hf_config
  m, size = config_from_hf(hf_config, **overrides)
  channels = int(vision_config(hf_config)[1]["num_channels"])
  files = safetensors_io.key_files(directory)
  prefix = find_prefix(files, PREFIXES[hf_config["model_type"]],
                       RULES[0].hf, directory)
  with safetensors_io.TensorReader(files) as reader:
    return m, read_params(reader, m, size, prefix, directory, channels)


def save(directory: str, model: ViT, params: Any, model_type: str | None = None,
         max_shard_bytes: int | None = None) -> None:
  """Writes ``config.json`` + ``model.safetensors`` (or shards) that
  ``CLIPVisionModel``/``SiglipVisionModel.from_pretrained(directory)`` loads (keys under
  ``vision_model.``, as the public checkpoints). ``model_type``: default by the ViT's shape."""
  model_type = model_type or export_type(model)
  if model_type is None or model_type not in ARCHITECTURES:
    raise ConfigError(f"model_type={model_type!r}: a ViT is written as one of "
                      f"{sorted(ARCHITECTURES)} when its options match (see config_to_hf)")
  params = rules.bare_params(params)
  kernel = np.asarray(params["embedding"]["kernel"])
  cfg = config_to_hf(model, image_size_of(model, params), model_type,
                     num_channels=kernel.shape[2], dtype=np.dtype(kernel.dtype).name)
  safetensors_io.save(directory, hf_tensors(model, params, EXPORT_PREFIX), cfg,
                      max_shard_bytes)


def weight_sources(directory: str, dst: str = "params", hf_config: dict | None = None,
                   what: str = "weights") -> list:
  """``[WeightSource]`` reading the tower into the ViT below ``dst`` of a train state."""
  from bigvl.checkpoint import WeightSource

  hf_config = safetensors_io.read_config(directory) if hf_config is None else hf_config
  m, _ = config_from_hf(hf_config)
  prefix = find_prefix(safetensors_io.key_files(directory), PREFIXES[hf_config["model_type"]],
                       RULES[0].hf, directory)
  key_fn, convert = rules.source_fns([(entries(m, prefix), m, "")])
  return [WeightSource(path=directory, dst=dst, key_fn=key_fn, convert=convert, what=what)]


def hf_outputs(m: ViT, params: Any, images: jax.Array) -> dict[str, jax.Array]:
  """transformers' ``last_hidden_state`` and ``pooler_output`` from ours (``images`` NHWC)."""
  pooled, tokens = m.apply({"params": params}, images)
  if m.has_cls:  # CLIP: post_layernorm on the pooled CLS token only
    tokens = m.apply({"params": params}, images, feature_layer=-1)
  return {"last_hidden_state": tokens, "pooler_output": pooled}
