"""LLaVA-1.5-7B-shaped LVLM: CLIP ViT-L/14-336 -> mlp2x_gelu -> Vicuna-7B (Llama-2-7B shape),
LoRA on every LM projection (LLaVA-1.5's LoRA recipe: rank 128, alpha 256), projector trained.

Import the real checkpoint (``llava-hf/llava-1.5-7b-hf``: ``config.json`` + safetensors +
``tokenizer.json``; download it yourself, bigvl never downloads) through the loop's
pretrained-init hook, every array read straight into its shards::

  python -m bigvl.main --config configs/lvlm_llava15_7b.py --workdir gs://.../llava_lora \\
      --config.init_from.model.path=/data/llava-1.5-7b-hf \\
      --config.input.tokenizer=/data/llava-1.5-7b-hf/tokenizer.json

(``bigvl.convert.load_hf_checkpoint(dir)`` loads the same directory in a notebook.) Memory:
``bench/lvlm_memory.py`` compiles this config's train step on a simulated 8-device mesh with
abstract arrays only and reports XLA's per-device memory (docs/lvlm.md).
"""

import ml_collections as mlc

from bigvl.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "lvlm_shapes").get_config("stage=2,lora=True")
  c.total_steps = 5000
  c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  c.input.batch_size = 128
  c.microbatches = 4  # 4 x 32 rows: 16.7 GiB a device on 8 devices (docs/lvlm.md)
  c.input.seq_len = 1024  # 576 image tokens + the conversation, packed 1 image a row
  c.input.max_images = 1
  c.input.image_size = 336
  c.input.template = "vicuna_v1"
  c.input.tokenizer = mlc.config_dict.placeholder(str)  # the checkpoint's tokenizer.json
  c.model.vision = dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                        pool="tok", activation="quick_gelu", norm_eps=1e-5, patch_bias=False,
                        pre_norm=True, remat=True)
  c.model.feature_layer = -2
  c.model.feature_select = "default"  # drop CLS: 576 image tokens
  c.model.lm = dict(vocab_size=32064, width=4096, depth=32, num_heads=32, num_kv_heads=32,
                    head_dim=128, mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5,
                    tie_embeddings=False, remat="full")
  c.model.lora = dict(rank=128, alpha=256.0, dropout=0.05,
                      targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")
  c.model.dtype = "bfloat16"
  c.optim.lr = 2e-4
  c.schedule.warmup_steps = 150
  c.generate.max_new_tokens = 64
  c.evals.captions.batch_size = 64
  c.evals.captions.every = 1000
  return c
