"""Public checkpoints (Hugging Face directories in safetensors) <-> bigvl models.

* :func:`load_hf_checkpoint` ``(directory) -> (model, params)``: import, dispatching on
  ``config.json``'s ``model_type``;
* :func:`save_hf_checkpoint` ``(directory, model, params)``: export (LoRA adapters merged)
  that ``transformers``' ``from_pretrained`` loads;
* :func:`weight_sources` ``(directory, dst) -> [WeightSource]``: the train loop's pretrained
  init (``config.init_from.<name>.path`` = such a directory), every leaf read straight into
  its shards by :func:`bigvl.checkpoint.read_weights`.

Pickled checkpoints (``.bin``) are refused. Formats live in :data:`FORMATS`,
``{model_type: module}``; a module provides

* ``load(directory, hf_config, **overrides) -> (model, params)``,
* ``weight_sources(directory, dst, hf_config, what) -> [WeightSource]``,
* optionally ``save(directory, model, params, model_type, max_shard_bytes)`` and
  ``export_type(model) -> model_type | None`` (which of its types a model is written as).

A new format is one line here, e.g. ``FORMATS["siglip_vision_model"] = vision`` (with
``from bigvl.convert import vision``).
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

from bigvl.config import ConfigError
from bigvl.convert import llama, llava, safetensors_io, vision

if TYPE_CHECKING:
  from bigvl.checkpoint import WeightSource

#: ``{config.json model_type: converter module}`` (see the module docstring).
FORMATS: dict[str, types.ModuleType] = {
    "llama": llama,
    "qwen2": llama,
    "clip_vision_model": vision,
    "clip": vision,  # its vision tower
    "siglip_vision_model": vision,
    "siglip": vision,  # its vision tower
    "llava": llava,
}


def _format(directory: str) -> tuple[types.ModuleType, dict]:
  cfg = safetensors_io.read_config(directory)
  model_type = cfg.get("model_type")
  if model_type not in FORMATS:
    raise ConfigError(f"{directory}/config.json: model_type={model_type!r} is not supported; "
                      f"known: {sorted(FORMATS)}")
  return FORMATS[model_type], cfg


def load_hf_checkpoint(directory: str, **overrides: Any) -> tuple[Any, Any]:
  """``directory`` (``config.json`` + ``*.safetensors``) -> ``(model, params)``: a flax module
  and its ``params`` tree (float32 host arrays), ready for ``model.apply({'params':
  params}, ...)``. ``overrides``: model-config fields that leave the parameters alone (e.g.
  compute ``dtype``). ConfigError for a missing ``config.json``, no safetensors, an unknown
  ``model_type``, missing tensors or shape mismatches."""
  module, cfg = _format(directory)
  return module.load(directory, cfg, **overrides)


def weight_sources(directory: str, dst: str = "params", what: str = "weights"
                   ) -> list[WeightSource]:
  """``[bigvl.checkpoint.WeightSource]`` filling the model below ``dst`` (a state-view
  prefix: ``'params'``, ``'params/llm'``) from ``directory``; ``what`` names the source in
  errors (``'config.init_from.lm.path'``)."""
  module, cfg = _format(directory)
  return module.weight_sources(directory, dst, cfg, what)


def save_hf_checkpoint(directory: str, model: Any, params: Any, model_type: str | None = None,
                       max_shard_bytes: int | None = None) -> None:
  """Writes ``model`` with ``params`` to ``directory`` as a Hugging Face checkpoint
  (``config.json`` + ``model.safetensors``, or shards of at most ``max_shard_bytes`` + an
  index). ``model_type``: default by the model (an ``LLM`` with q/k/v biases -> ``qwen2``,
  else ``llama``). LoRA adapters are merged into the kernels first."""
  if model_type is None:
    for module in dict.fromkeys(FORMATS.values()):
      model_type = getattr(module, "export_type", lambda m: None)(model)
      if model_type is not None:
        break
    else:
      raise ConfigError(f"no exporter for {type(model).__name__}; pass model_type= one of "
                        f"{sorted(FORMATS)}")
  if model_type not in FORMATS or not hasattr(FORMATS[model_type], "save"):
    raise ConfigError(f"model_type={model_type!r} cannot be exported; known: "
                      f"{sorted(k for k, m in FORMATS.items() if hasattr(m, 'save'))}")
  FORMATS[model_type].save(directory, model, params, model_type, max_shard_bytes)
