"""SigLIP (sigmoid loss) two-tower training on the synthetic ``shapes_captions`` dataset.

  python -m bigvl.main --config configs/siglip_shapes.py:tiny --workdir /tmp/bigvl/siglip

``:tiny`` finishes on a 2-core CPU in minutes; no arg is a GPU/TPU-sized run of the same.
``:size=s16`` / ``:size=b16`` are the SigLIP paper's ViT-S/16 and ViT-B/16 shapes at 224 px
(text: context 64, a 32,000-token table) that ``bench/`` measures.
"""

import ml_collections as mlc

from bigvl.config import ConfigError, parse_arg

#: ``size=`` -> (width, depth, heads) of both towers (SigLIP, Zhai et al. 2023, Table 1).
SIZES = {"s16": (384, 12, 6), "b16": (768, 12, 12)}


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, size="")
  c = mlc.ConfigDict()
  c.task = "two_tower"
  c.seed = 0
  c.total_steps = 800 if a.tiny else 20_000
  c.log_every = 100 if a.tiny else 200
  c.ckpt_every = 200 if a.tiny else 2000
  c.keep_ckpts = 2
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical axis name (named on each parameter by the model) -> mesh axes, MaxText style.
  # The token table's rows go over fsdp too (its lookup is then a sharded gather, never a
  # gathered table), and the towers' residual stream keeps the batch sharded: together the
  # FSDP step moves no more than FSDP's minimum (bench/collectives.md).
  c.logical_axis_rules = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
                          ("vocab", ("tensor", "fsdp")), ("kv", None), ("proj", None),
                          ("norm", None), ("batch", ("data", "fsdp")), ("length", None),
                          ("act_embed", None))

  c.input = mlc.ConfigDict()
  c.input.dataset = "shapes_captions"
  c.input.data_dir = mlc.config_dict.placeholder(str)  # None: $BIGVL_DATA or ~/tensorflow_datasets
  c.input.batch_size = 128 if a.tiny else 1024
  c.input.captions_per_image = 1
  c.input.max_len = 16
  # tiny: one reader thread; a second only contends with XLA for a laptop's cores (the
  # GIL serializes the readers; same batches either way)
  c.input.num_threads = 1 if a.tiny else 2

  c.model = mlc.ConfigDict()
  c.model.name = "two_tower"
  width = 64 if a.tiny else 384
  depth = 2 if a.tiny else 6
  c.model.image = dict(patch_size=4, width=width, depth=depth, num_heads=4,
                       mlp_dim=4 * width, pool="gap")
  c.model.text = dict(width=width, depth=depth, num_heads=4, mlp_dim=4 * width, pool="eos")
  if a.size in SIZES:  # the paper's towers at 224 px
    width, depth, heads = SIZES[a.size]
    c.input.image_size = 224
    c.input.max_len = 64
    tower = dict(width=width, depth=depth, num_heads=heads, mlp_dim=4 * width)
    c.model.image = dict(patch_size=16, pool="gap", **tower)
    c.model.text = dict(pool="eos", vocab_size=32_000, **tower)
  elif a.size:
    raise ConfigError(f"config arg size={a.size!r}: choose from {', '.join(SIZES)}")
  for tower in (c.model.image, c.model.text):  # speed/memory knobs (docs/benchmarks.md)
    tower.update(remat="none", scan=False)  # remat: none | full | dots | dots_no_batch
  c.model.embed_dim = width
  c.model.temperature_init = 10.0  # t' = log 10
  c.model.bias_init = -10.0
  c.model.dtype = "float32"

  c.loss = mlc.ConfigDict({"name": "sigmoid"})

  c.optim = mlc.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 3e-3 if a.tiny else 1e-3
  c.optim.wd = 1e-4
  c.optim.clip_norm = 1.0
  c.optim.b2 = 0.95
  c.schedule = mlc.ConfigDict({"warmup_steps": 80 if a.tiny else 1000, "decay": "cosine"})

  every = c.total_steps
  c.evals = mlc.ConfigDict()
  c.evals.zeroshot = dict(type="zeroshot", every=every, split="test", batch_size=256,
                          prompts=("a {}", "a picture of a {}"))
  c.evals.retrieval = dict(type="retrieval", every=every, split="test", batch_size=256,
                           num_captions=5)
  c.evals.compositionality = dict(type="compositionality", every=every, split="test",
                                  batch_size=256, num_examples=512)
  return c
