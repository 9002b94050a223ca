"""VladVA at full size: LLaVA-1.5-7B (imported weights), LoRA r16 / alpha 16 on every LM linear
layer, image and text soft prompts from the summary prompts, contrastive + NTP.

  python -m bigvl.main --config configs/vladva_llava15_7b.py --workdir W \\
      --config.init_from.lvlm.path=/data/llava-1.5-7b-hf \\
      --config.input.tokenizer=/data/llava-1.5-7b-hf/tokenizer.json

(point ``input.dataset`` at an image-caption dataset with short captions and long
descriptions). Memory from XLA on a simulated 8-device mesh:
``python bench/lvlm_memory.py --config configs/vladva_llava15_7b.py`` (docs/vladva.md).
"""

import ml_collections as mlc

from bigvl.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "vladva_shapes").get_config(None)
  big = load_sibling(__file__, "lvlm_llava15_7b").get_config(None)
  c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.microbatches = 4
  c.input.batch_size = 256
  c.input.image_size = 336
  c.input.template = "vicuna_v1"
  c.input.tokenizer = mlc.config_dict.placeholder(str)
  c.input.max_len = 64
  c.input.ntp_len = 768  # 576 image tokens + the conversation and a long description
  for key in ("vision", "lm", "feature_layer", "feature_select", "dtype"):
    c.model[key] = big.model[key]
  c.model.lora = dict(rank=16, alpha=16.0, dropout=0.0,
                      targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")
  c.init_from.lvlm = dict(path=mlc.config_dict.placeholder(str), dst="params/lvlm",
                          keep_init=r"lora_[ab]$|soft_prompts_")
  c.optim.lr = 2e-4
  c.schedule.warmup_steps = 100
  c.total_steps = 2000
  for ev in c.evals.values():
    ev.batch_size = 256
    ev.every = 1000
  return c
