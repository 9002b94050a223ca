"""CLIP-DPO at full size: DPO of LLaVA-1.5-7B (imported weights) with LoRA adapters on every LM
projection, against a frozen copy of the same checkpoint as the reference model.

Stages as ``configs/clip_dpo_shapes.py`` (candidates from the SFT pool with the LVLM, ranking with
a CLIP / SigLIP two-tower, then this DPO run). The policy and the frozen reference are both read
from the public checkpoint, every array straight into its shards::

  python -m bigvl.main --config configs/clip_dpo_llava15_7b.py --workdir gs://.../clip_dpo \\
      --config.init_from.policy.path=/data/llava-1.5-7b-hf \\
      --config.dpo.reference_path=/data/llava-1.5-7b-hf \\
      --config.input.tokenizer=/data/llava-1.5-7b-hf/tokenizer.json \\
      --config.input.dataset=<the SFT pool's TFDS name> \\
      --config.input.preferences=gs://.../rank/preferences.jsonl

``--config.dpo.reference=adapters_off`` drops the second copy of the weights (the reference is
the policy with its adapters off: exact while only adapters train). Memory from XLA on a
simulated 8-device mesh: ``python bench/lvlm_memory.py --config configs/clip_dpo_llava15_7b.py
--preferences_stub`` (docs/clip_dpo.md).
"""

import ml_collections as mlc

from bigvl.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "clip_dpo_shapes").get_config("stage=dpo")
  big = load_sibling(__file__, "lvlm_llava15_7b").get_config(None)
  c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.total_steps = 3000
  c.input.batch_size = 64  # pairs: 128 sequences a step
  c.microbatches = 4
  c.input.seq_len = 768  # 576 image tokens + the question + a detailed answer
  c.input.image_size = 336
  c.input.template = "vicuna_v1"
  c.input.tokenizer = mlc.config_dict.placeholder(str)
  for key in ("vision", "lm", "feature_layer", "feature_select", "dtype"):
    c.model[key] = big.model[key]
  c.model.lora = dict(rank=128, alpha=256.0, dropout=0.05,
                      targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")
  c.init_from.policy.path = mlc.config_dict.placeholder(str)
  c.init_from.policy.src = mlc.config_dict.placeholder(str)  # a Hugging Face directory: none
  c.dpo.reference_path = mlc.config_dict.placeholder(str)
  c.dpo.beta = 0.1
  c.optim.lr = 5e-5  # LoRA: ~10x a full fine-tune's DPO learning rate
  c.schedule.warmup_steps = 100
  c.generate.max_new_tokens = 128
  c.evals.hallucination.batch_size = 64
  c.evals.hallucination.every = 1000
  return c
