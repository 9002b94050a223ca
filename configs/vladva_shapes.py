"""VladVA (discriminative fine-tuning of an LVLM) on ``shapes_captions``, from the tiny
captioner of ``configs/lvlm_shapes.py``.

  python -m bigvl.main --config configs/lvlm_shapes.py:tiny --workdir /tmp/bigvl/lvlm
  python -m bigvl.main --config configs/vladva_shapes.py:tiny,captioner=/tmp/bigvl/lvlm \\
      --workdir /tmp/bigvl/vladva

Args: ``captioner`` (the captioner run to start from; required), ``variant``:

* ``full`` (default): LoRA (r16, alpha 16, every LM linear layer) + image/text soft prompts
  (started at the summary prompts' tokens) + temperature; contrastive + NTP on descriptions;
* ``no_ntp``: the contrastive loss alone; ``no_soft``: hand-written prompts, LoRA only;
  ``soft_only``: soft prompts, no LoRA; ``full_ft``: every parameter trains (no LoRA).
"""

import ml_collections as mlc

from bigvl.config import load_sibling, parse_arg

VARIANTS = ("full", "no_ntp", "no_soft", "soft_only", "full_ft")


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, captioner="", variant="full")
  if a.variant not in VARIANTS:
    raise ValueError(f"variant={a.variant!r}: one of {VARIANTS}")
  c = load_sibling(__file__, "lvlm_shapes").get_config("tiny" if a.tiny else None)
  c.task = "lvlm_disc"
  c.total_steps = 300 if a.tiny else 5000
  c.log_every = 50 if a.tiny else 100
  c.ckpt_every = 300 if a.tiny else 1000
  for key in ("seq_len", "max_images", "answer_key", "question"):
    del c.input[key]
  c.input.batch_size = 64 if a.tiny else 512
  c.input.max_len = 32  # [BOS] caption summary-prompt
  c.input.ntp_len = 80  # the long description, read with its image
  del c.generate
  c.prompts = mlc.ConfigDict({"image": mlc.config_dict.placeholder(str),
                              "text": mlc.config_dict.placeholder(str)})  # None: the default
  c.model.lora = dict(rank=0 if a.variant in ("soft_only", "full_ft") else 16, alpha=16.0,
                      dropout=0.0, targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")
  del c.model.soft_prompt_tokens
  c.model.soft_prompts = a.variant != "no_soft"
  c.model.trainable = r"." if a.variant == "full_ft" else r"lora_[ab]$|soft_prompts_|^[tb]$"
  c.model.temperature_init = 10.0
  c.model.bias_init = -10.0
  c.loss = mlc.ConfigDict({"name": "softmax", "impl": "dense",
                           "ntp_weight": 0.0 if a.variant == "no_ntp" else 1.0})
  c.init_from = mlc.ConfigDict()
  c.init_from.lvlm = dict(path=a.captioner or mlc.config_dict.placeholder(str),
                          dst="params/lvlm", src="params",
                          keep_init=r"lora_[ab]$|soft_prompts_")  # new: not in the captioner
  c.optim.lr = 1e-3 if a.tiny else 1e-4
  c.schedule.warmup_steps = 30 if a.tiny else 300
  every = c.total_steps
  c.evals = mlc.ConfigDict()
  c.evals.retrieval = dict(type="retrieval", every=every, split="test", batch_size=128,
                           num_captions=5)
  c.evals.zeroshot = dict(type="zeroshot", every=every, split="test", batch_size=128,
                          prompts=("a {}", "a picture of a {}"))
  c.evals.compositionality = dict(type="compositionality", every=every, split="test",
                                  batch_size=128, num_examples=512)
  return c
