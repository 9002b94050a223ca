"""LLaVA checkpoints (``LlavaForConditionalGeneration``, model_type ``llava``: a CLIP or SigLIP
vision tower, the ``mlp2x_gelu`` projector, a Llama/Qwen2 decoder) <->
:class:`bigvl.models.lvlm.LVLM`.

No table of its own for the two big parts: the vision tower is :data:`bigvl.convert.vision.RULES`
under a key prefix, the decoder :data:`bigvl.convert.llama.RULES` with ``model.`` / ``lm_head.``
moved under theirs; only the projector has a table of its own (four entries), :data:`PROJECTOR`
(``projector/fc{1,2}`` <-> ``multi_modal_projector.linear_{1,2}``, torch ``[out, in]``
transposed).

Key layouts (import detects which; export writes the first, what the public ``llava-hf``
checkpoints hold and transformers 4 and 5 both load):

* llava-hf / transformers 5 ``save_pretrained``: ``vision_tower.[vision_model.]``,
  ``multi_modal_projector.``, ``language_model.model.``, ``language_model.lm_head.``;
* transformers >= 4.52 state dicts: ``model.vision_tower.[vision_model.]``,
  ``model.multi_modal_projector.``, ``model.language_model.``, ``lm_head.``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from bigvl.config import ConfigError
from bigvl.convert import llama, safetensors_io, vision
from bigvl.models import lora as lora_lib
from bigvl.models.llm import LLMConfig
from bigvl.models.lvlm import LVLM

MODEL_TYPES = ("llava",)
VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.",
                   "model.vision_tower.vision_model.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
BODY_PREFIXES = ("language_model.model.", "model.language_model.")
HEAD_PREFIXES = ("language_model.lm_head.", "lm_head.")
#: transformers' ``LlamaConfig`` defaults (llava-hf configs leave most of them out).
LLAMA_DEFAULTS = dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                      intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
#: ``(our path below projector/, HF key below the projector prefix, transposed)``.
PROJECTOR: tuple[tuple[str, str, bool], ...] = (
    ("fc1/kernel", "linear_1.weight", True), ("fc1/bias", "linear_1.bias", False),
    ("fc2/kernel", "linear_2.weight", True), ("fc2/bias", "linear_2.bias", False),
)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The key prefixes of one checkpoint's four parts."""

  vision: str = VISION_PREFIXES[0]
  projector: str = PROJECTOR_PREFIXES[0]
  body: str = BODY_PREFIXES[0]
  head: str = HEAD_PREFIXES[0]

  def lm_key(self, key: str) -> str:
    """A ``LlamaForCausalLM`` key (``model.*``, ``lm_head.*``) -> this layout's."""
    for old, new in (("model.", self.body), ("lm_head.", self.head)):
      if key.startswith(old):
        return new + key[len(old):]
    raise AssertionError(f"unexpected decoder key {key!r}")

  def lm_keys(self, rule: llama.Rule, c: LLMConfig) -> str | list[str]:
    keys = rule.keys(c)
    return [self.lm_key(k) for k in keys] if rule.per_layer else self.lm_key(keys)


def detect_layout(keys: set[str], tied: bool, what: str) -> Layout:
  """The :class:`Layout` of a checkpoint from its keys (ConfigError when a part is absent)."""
  probe = vision.RULES[0].hf
  return Layout(
      vision=vision.find_prefix(keys, VISION_PREFIXES, probe, what),
      projector=vision.find_prefix(keys, PROJECTOR_PREFIXES, PROJECTOR[0][1], what),
      body=vision.find_prefix(keys, BODY_PREFIXES, "embed_tokens.weight", what),
      head=HEAD_PREFIXES[0] if tied else vision.find_prefix(keys, HEAD_PREFIXES, "weight",
                                                            what))


# --- configs ---------------------------------------------------------------------------------

def _text_config(cfg: dict) -> dict:
  text = {k: v for k, v in (cfg.get("text_config") or {}).items() if v is not None}
  return {**LLAMA_DEFAULTS, **text}


def config_from_hf(cfg: dict, **overrides: Any) -> LVLM:
  """A ``LlavaConfig`` dict -> :class:`LVLM`. ``overrides``: ``dtype`` (both towers),
  ``LLMConfig`` fields (the decoder) and ``vision_<ViT field>`` (the tower), none of which
  change the parameters. ConfigError for what LVLM cannot compute exactly: a projector
  activation other than ``gelu``, a list of feature layers, ``'default'`` selection on a
  tower without a CLS token (HF would drop the first patch)."""
  what = "config.json (model_type='llava')"
  if cfg.get("model_type") not in MODEL_TYPES:
    raise ConfigError(f"config.json: model_type={cfg.get('model_type')!r} is not llava")
  vision_cfg = {"model_type": "clip_vision_model", **(cfg.get("vision_config") or {})}
  lm_over = {k: v for k, v in overrides.items() if k in LLMConfig.__dataclass_fields__}
  vit_over = {k[len("vision_"):]: v for k, v in overrides.items() if k.startswith("vision_")}
  unknown = set(overrides) - set(lm_over) - {f"vision_{k}" for k in vit_over}
  if unknown:
    raise ConfigError(f"unknown LVLM overrides {sorted(unknown)}")
  if "dtype" in overrides:
    vit_over.setdefault("dtype", overrides["dtype"])
  tower, image_size = vision.config_from_hf(vision_cfg, **vit_over)
  lm = dataclasses.replace(llama.config_from_hf(_text_config(cfg)), **lm_over)
  act = cfg.get("projector_hidden_act", "gelu")
  if act != "gelu":
    raise ConfigError(f"{what}: projector_hidden_act={act!r}; LVLM's projector is mlp2x_gelu "
                      f"(exact GELU)")
  layer = cfg.get("vision_feature_layer", -2)
  if not isinstance(layer, int):
    raise ConfigError(f"{what}: vision_feature_layer={layer!r}; only one layer is supported")
  select = cfg.get("vision_feature_select_strategy", "default")
  if select == "default" and not tower.has_cls:
    raise ConfigError(f"{what}: vision_feature_select_strategy='default' drops the first "
                      f"token, but this tower has no CLS token; LVLM drops only a CLS token")
  image_token = cfg.get("image_token_index", cfg.get("image_token_id", 32000))
  return LVLM(tower, lm, image_token_id=int(image_token), image_size=image_size,
              feature_layer=int(layer), feature_select=select,
              projector_bias=bool(cfg.get("multimodal_projector_bias", True)))


def config_to_hf(model: LVLM, params: Any, *, dtype: str = "float32") -> dict:
  """:class:`LVLM` -> a ``LlavaConfig`` dict (the tower's and the decoder's configs inside)."""
  tower_type = vision.export_type(model.vision)
  if tower_type is None:
    raise ConfigError("this LVLM's ViT is neither a CLIP nor a SigLIP tower; see "
                      "bigvl.convert.vision.config_to_hf")
  if model.feature_select == "default" and not model.vision.has_cls:
    raise ConfigError("feature_select='default' on a tower without CLS cannot be written "
                      "(HF would drop the first patch): use 'full'")
  channels = np.shape(params["vision"]["embedding"]["kernel"])[2]
  vision_cfg = vision.config_to_hf(model.vision, model.image_size, tower_type,
                                   num_channels=channels, dtype=dtype)
  text_cfg = llama.config_to_hf(model.lm, llama.default_model_type(model.lm), dtype=dtype)
  for c in (vision_cfg, text_cfg):
    c.pop("architectures", None)
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
          "vision_config": vision_cfg, "text_config": text_cfg,
          "image_token_index": model.image_token_id,
          "image_seq_length": model.num_image_tokens, "projector_hidden_act": "gelu",
          "multimodal_projector_bias": model.projector_bias,
          "vision_feature_layer": model.feature_layer,
          "vision_feature_select_strategy": model.feature_select,
          "tie_word_embeddings": model.lm.tie_embeddings, "dtype": dtype,
          "torch_dtype": dtype}


# --- import / export / pretrained init -------------------------------------------------------

def _read_lm(reader: safetensors_io.TensorReader, c: LLMConfig, layout: Layout,
             what: str) -> dict:
  """The decoder's params, through :data:`llama.RULES` with ``layout``'s keys."""
  shapes = llama.param_shapes(c)
  todo = [(r, layout.lm_keys(r, c)) for r in llama.rules(c)]
  missing = [k for _, keys in todo for k in (keys if isinstance(keys, list) else [keys])
             if k not in reader.files]
  if missing:
    more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
    raise ConfigError(f"{what}: missing tensors {missing[:8]}{more} that its config.json "
                      f"implies")
  flat = {}
  for rule, keys in todo:
    want = llama.hf_shape(rule, c, shapes[rule.ours])
    for k in keys if rule.per_layer else [keys]:
      if reader.shape(k) != want:
        raise ConfigError(f"{what}: tensor {k!r} has shape {reader.shape(k)} but config.json "
                          f"implies {want} (for lm/{rule.ours})")
    read = [np.asarray(rule.to_ours(reader.get(k), c), np.float32)
            for k in (keys if rule.per_layer else [keys])]
    flat[rule.ours] = np.stack(read) if rule.per_layer else read[0]
  return vision.nest(flat)


def _read_projector(reader: safetensors_io.TensorReader, model: LVLM, prefix: str,
                    what: str) -> dict:
  d_in = model.vision.width
  d = model.lm.width
  want = {"fc1/kernel": (d_in, d), "fc1/bias": (d,), "fc2/kernel": (d, d), "fc2/bias": (d,)}
  flat = {}
  for ours, key, transposed in _projector_rules(model):
    if prefix + key not in reader.files:
      raise ConfigError(f"{what}: missing tensor {prefix + key!r}")
    x = reader.get(prefix + key)
    x = np.asarray(x.T if transposed else x, np.float32)
    if x.shape != want[ours]:
      raise ConfigError(f"{what}: tensor {prefix + key!r} gives projector/{ours} of shape "
                        f"{x.shape}; config.json implies {want[ours]}")
    flat[ours] = x
  return vision.nest(flat)


def _projector_rules(model: LVLM) -> list[tuple[str, str, bool]]:
  return [r for r in PROJECTOR if model.projector_bias or not r[0].endswith("bias")]


def load(directory: str, hf_config: dict | None = None, **overrides: Any
         ) -> tuple[LVLM, dict]:
  """A LLaVA checkpoint directory -> ``(LVLM, params)``: ``{'vision', 'projector', 'lm'}``
  (float32 numpy; the decoder's layers stacked on axis 0). Missing tensors are named and
  shapes checked before the model is returned."""
  hf_config = safetensors_io.read_config(directory) if hf_config is None else hf_config
  model = config_from_hf(hf_config, **overrides)
  files = safetensors_io.key_files(directory)
  layout = detect_layout(set(files), model.lm.tie_embeddings, directory)
  channels = int(vision.vision_config(
      {"model_type": "clip_vision_model", **(hf_config.get("vision_config") or {})}
  )[1]["num_channels"])
  with safetensors_io.TensorReader(files) as reader:
    params = {
        "vision": vision.read_params(reader, model.vision, model.image_size, layout.vision,
                                     directory, channels),
        "projector": _read_projector(reader, model, layout.projector, directory),
        "lm": _read_lm(reader, model.lm, layout, directory),
    }
  return model, params


def export_type(model: Any) -> str | None:
  return "llava" if isinstance(model, LVLM) else None


def save(directory: str, model: LVLM, params: Any, model_type: str | None = None,
         max_shard_bytes: int | None = None) -> None:
  """Writes a ``LlavaForConditionalGeneration`` checkpoint (llava-hf key layout, see the
  module docstring). LoRA adapters are merged first; tensors keep the params' dtype."""
  if (model_type or "llava") != "llava":
    raise ConfigError(f"an LVLM is written as model_type 'llava', not {model_type!r}")
  params = nn.meta.unbox(params)
  if set(params) == {"params"}:
    params = params["params"]
  params = jax.device_get(lora_lib.merge(params, model.lm.lora))
  layout = Layout()
  c = model.lm
  lm = vision.flatten(params["lm"])
  tensors = vision.hf_tensors(model.vision, params["vision"], layout.vision)
  for ours, key, transposed in _projector_rules(model):
    x = np.asarray(vision.flatten(params["projector"])[ours])
    tensors[layout.projector + key] = x.T if transposed else x
  for rule in llama.rules(c):
    if rule.ours not in lm:
      raise ConfigError(f"params have no lm/{rule.ours!r} (the llava export needs it)")
    x = np.asarray(lm[rule.ours])
    keys = layout.lm_keys(rule, c)
    if rule.per_layer:
      tensors.update({k: rule.to_hf(x[i], c) for i, k in enumerate(keys)})
    else:
      tensors[keys] = rule.to_hf(x, c)
  dtype = np.dtype(lm["embed/embedding"].dtype).name
  safetensors_io.save(directory, tensors, config_to_hf(model, params, dtype=dtype),
                      max_shard_bytes)


def weight_sources(directory: str, dst: str = "params", hf_config: dict | None = None,
                   what: str = "weights") -> list:
  """``[WeightSource]`` reading the checkpoint into the LVLM below ``dst`` of a train state
  (``vision/``, ``projector/``, ``lm/``); LoRA adapters keep their init."""
  from bigvl.checkpoint import WeightSource

  hf_config = safetensors_io.read_config(directory) if hf_config is None else hf_config
  model = config_from_hf(hf_config)
  c = model.lm
  layout = detect_layout(set(safetensors_io.key_files(directory)), c.tie_embeddings,
                         directory)
  vision_key, vision_convert = vision.source_fns(model.vision, layout.vision, "vision/")
  projector = {f"projector/{ours}": (layout.projector + key, transposed)
               for ours, key, transposed in _projector_rules(model)}

  def key_fn(rel: str) -> str | list[str] | None:
    if rel.startswith("vision/"):
      return vision_key(rel)
    if rel in projector:
      return projector[rel][0]
    if rel.startswith("lm/") and rel[3:] in llama.BY_PATH:
      return layout.lm_keys(llama.BY_PATH[rel[3:]], c)
    if rel.rsplit("/", 1)[-1] in ("lora_a", "lora_b"):
      return None
    return rel

  def convert(rel: str, x: np.ndarray) -> np.ndarray:
    if rel.startswith("vision/"):
      return vision_convert(rel, x)
    if rel in projector:
      return x.T if projector[rel][1] else x
    return llama.BY_PATH[rel[3:]].to_ours(x, c)

  return [WeightSource(path=directory, dst=dst, key_fn=key_fn, convert=convert, what=what)]

