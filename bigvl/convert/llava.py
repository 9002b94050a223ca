"""LLaVA checkpoints (``LlavaForConditionalGeneration``, model_type ``llava``: a CLIP or SigLIP
vision tower, the ``mlp2x_gelu`` projector, a Llama/Qwen2 decoder) <->
:class:`bigvl.models.lvlm.LVLM`.

No table of its own for the two big parts: the vision tower is :data:`bigvl.convert.vision.RULES`
under a key prefix, the decoder :data:`bigvl.convert.llama.RULES` with ``model.`` / ``lm_head.``
moved under theirs; only the projector has a table of its own (four entries), :data:`PROJECTOR`
(``projector/fc{1,2}`` <-> ``multi_modal_projector.linear_{1,2}``, torch ``[out, in]``
transposed). All three are read and written by :mod:`bigvl.convert.rules`.

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

import jax
import numpy as np

from bigvl.config import ConfigError
from bigvl.convert import llama, rules, safetensors_io, vision
from bigvl.convert.rules import Rule
from bigvl.models import lora as lora_lib
from bigvl.models.llm import LLMConfig
from bigvl.models.lvlm import LVLM

MODEL_TYPES = ("llava",)
VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.",
                   "model.vision_tower.vision_model.", "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
BODY_PREFIXES = ("language_model.model.", "model.language_model.")
HEAD_PREFIXES = ("language_model.lm_head.", "lm_head.")


def _projector_bias(model: LVLM) -> bool:
  return model.projector_bias


#: our path below ``projector/`` <-> the HF key below the projector prefix.
PROJECTOR: tuple[Rule, ...] = tuple(
    r for n in (1, 2) for r in (
        Rule(f"fc{n}/kernel", f"linear_{n}.weight", rules.transpose, rules.transpose),
        Rule(f"fc{n}/bias", f"linear_{n}.bias", when=_projector_bias)))


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

  def projector_key(self, key: str) -> str:
    return self.projector + key


def detect_layout(keys: set[str], tied: bool, what: str) -> Layout:
  """The :class:`Layout` of a checkpoint from its keys (ConfigError when a part is absent)."""
  probe = vision.RULES[0].hf
  return Layout(
      vision=vision.find_prefix(keys, VISION_PREFIXES, probe, what),
      projector=vision.find_prefix(keys, PROJECTOR_PREFIXES, PROJECTOR[0].hf, what),
      body=vision.find_prefix(keys, BODY_PREFIXES, "embed_tokens.weight", what),
      head=HEAD_PREFIXES[0] if tied else vision.find_prefix(keys, HEAD_PREFIXES, "weight",
                                                            what))


# --- configs ---------------------------------------------------------------------------------

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
  lm = llama.config_from_hf(llama.text_config(cfg.get("text_config")))
  lm = dataclasses.replace(lm, **lm_over)
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

def _projector_entries(model: LVLM, layout: Layout) -> list[rules.Entry]:
  return rules.entries(PROJECTOR, model, 0, layout.projector_key)


def _read_projector(reader: safetensors_io.TensorReader, model: LVLM, layout: Layout,
                    what: str) -> dict:
  d_in, d = model.vision.width, model.lm.width
  shapes = {"fc1/kernel": (d_in, d), "fc1/bias": (d,), "fc2/kernel": (d, d), "fc2/bias": (d,)}
  return rules.read(reader, _projector_entries(model, layout), model, shapes, what,
                    "projector/")


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
        "projector": _read_projector(reader, model, layout, directory),
        "lm": llama.read_params(reader, model.lm, layout.lm_key, directory, "lm/"),
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
  params = jax.device_get(lora_lib.merge(rules.bare_params(params), model.lm.lora))
  layout = Layout()
  tensors = {
      **vision.hf_tensors(model.vision, params["vision"], layout.vision),
      **rules.write(_projector_entries(model, layout), params["projector"], model, "llava",
                    "projector/"),
      **llama.hf_tensors(model.lm, params["lm"], layout.lm_key, "llava", "lm/"),
  }
  dtype = np.dtype(params["lm"]["embed"]["embedding"].dtype).name
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
  key_fn, convert = rules.source_fns(
      [(vision.entries(model.vision, layout.vision), model.vision, "vision/"),
       (_projector_entries(model, layout), model, "projector/"),
       (llama.entries(c, layout.lm_key, every=True), c, "lm/")],
      lambda rel: None if rel.startswith("vision/") else rules.missing_unless_adapter(rel))
  return [WeightSource(path=directory, dst=dst, key_fn=key_fn, convert=convert, what=what)]

