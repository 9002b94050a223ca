"""A LLaVA-style captioner (ViT -> MLP projector -> Llama-shaped decoder) on ``shapes_captions``.

  python -m bigvl.main --config configs/lvlm_shapes.py:tiny --workdir /tmp/bigvl/lvlm

Args (``:tiny,stage=...``):

* ``stage=scratch`` (default): every part trains from random init -- the tiny captioner that
  the VladVA and CLIP-DPO configs start from (a 2-core CPU trains it in minutes).
* ``stage=1``: LLaVA stage 1, only the projector trains; the image tower comes from a SigLIP
  run (``init_from.vision``, e.g. ``configs/siglip_shapes.py:tiny``'s workdir) and the LM from
  a public-format directory (``init_from.lm``: ``config.json`` + safetensors) -- set both.
* ``stage=2``: projector + LM (``lora=True``: projector + LoRA adapters on the LM's attention
  and MLP projections), from a stage-1 run (``init_from.model``).

``answer=caption`` trains on the short caption, ``description`` on the long scene
description, ``both`` draws one of them per example (with its question).
"""

import ml_collections as mlc

from bigvl.config import parse_arg

#: ``model.trainable`` (regex over parameter paths) of each stage.
TRAINABLE = {"scratch": r".", "1": r"^projector/", "2": r"^(projector|lm)/",
             "2_lora": r"^projector/|lora_[ab]$"}
ANSWERS = {"caption": "caption", "description": "description",
           "both": ("caption", "description")}


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, stage="scratch", lora=False, answer="caption")
  c = mlc.ConfigDict()
  c.task = "lvlm_caption"
  c.seed = 0
  c.total_steps = 600 if a.tiny else 20_000
  c.log_every = 50 if a.tiny else 100
  c.ckpt_every = 200 if a.tiny else 2000
  c.keep_ckpts = 2
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.input = mlc.ConfigDict()
  c.input.dataset = "shapes_captions"
  c.input.data_dir = mlc.config_dict.placeholder(str)
  c.input.batch_size = 16 if a.tiny else 256  # packed rows
  c.input.seq_len = 128
  c.input.max_images = 4
  c.input.template = "plain"
  c.input.answer_key = ANSWERS[str(a.answer)]
  c.input.question = mlc.config_dict.placeholder(str)
  # tiny: one reader thread; a second only contends with XLA for a laptop's cores (the
  # GIL serializes the readers; same batches either way)
  c.input.num_threads = 1 if a.tiny else 2

  width = 64 if a.tiny else 384
  c.model = mlc.ConfigDict()
  c.model.vision = dict(patch_size=8, width=width, depth=2 if a.tiny else 6, num_heads=4,
                        mlp_dim=4 * width, pool="gap")
  c.model.lm = dict(width=width, depth=2 if a.tiny else 8, num_heads=4, num_kv_heads=2,
                    head_dim=width // 4, mlp_dim=3 * width, rope_theta=10000.0,
                    tie_embeddings=True, remat="none" if a.tiny else "dots")
  c.model.lora = dict(rank=8 if a.lora else 0, alpha=16.0, dropout=0.05,
                      targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")
  c.model.soft_prompt_tokens = 0
  c.model.feature_layer = -1
  c.model.feature_select = "full"
  stage = str(a.stage)
  if stage not in ("scratch", "1", "2"):
    raise ValueError(f"stage={stage!r}: scratch, 1 or 2")
  c.model.trainable = TRAINABLE[stage + ("_lora" if a.lora and stage == "2" else "")]
  c.model.dtype = "float32"

  c.init_from = mlc.ConfigDict()
  if stage == "1":
    c.init_from.vision = dict(path=mlc.config_dict.placeholder(str), dst="params/vision",
                              src="params/img")
    c.init_from.lm = dict(path=mlc.config_dict.placeholder(str), dst="params/lm")
  elif stage == "2":
    c.init_from.model = dict(path=mlc.config_dict.placeholder(str), dst="params")

  c.generate = mlc.ConfigDict({"max_new_tokens": 24})

  c.optim = mlc.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 2e-3 if a.tiny else 2e-4
  c.optim.wd = 0.0
  c.optim.clip_norm = 1.0
  c.optim.b2 = 0.95
  c.schedule = mlc.ConfigDict({"warmup_steps": 50 if a.tiny else 500, "decay": "cosine"})

  c.evals = mlc.ConfigDict()
  c.evals.captions = dict(type="captioning", every=c.total_steps, split="test",
                          num_examples=128, batch_size=64)
  return c
