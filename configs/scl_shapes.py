"""Spatial Contrastive Learning (``bigvl.tasks.fewshot``, method ``scl``) vs its cross-entropy
baseline on ``shapes_fewshot``: pre-train on the 60 base classes, evaluate 5-way 1-shot and
5-shot episodes of the 20 unseen test classes (``bigvl.evaluators.fewshot``).

  python -m bigvl.main --config configs/scl_shapes.py:tiny --workdir /tmp/bigvl/scl

Args: ``ce`` (the baseline: the same backbone, views, steps and optimizer, no contrastive
term); ``tiny`` (``shapes_fewshot/small``, a narrow ResNet-12, 60 steps, 100 episodes: a
minute on a 2-core CPU); ``cpu`` (the experiment of ``bench/experiments/scl_shapes.py``: the
full dataset, ResNet-12 of widths 16-128, batch 32, 1,000 steps, ``aug=weak``, 600
episodes); ``global_weight=`` (the optional global contrastive term); ``teacher=`` (a
finished run: the distillation stage); ``steps=``; ``batch=``; ``aug=`` (:data:`AUGS`). No
size arg: the official ResNet-12 (64-640) and batch 64, for an accelerator.
"""

import ml_collections as mlc

from bigvl.config import parse_arg

#: one view's augmentation: the task's default (flip, random crop, two hue-keeping RandAugment
#: ops, Cutout; ``bigvl.tasks.fewshot.VIEW_OPS``) or ``weak`` (flip + random crop with reflect
#: padding: the geometric part of the official first view, cheap on a CPU host)
AUGS = {"randaugment": None, "weak": [{"op": "weak", "flip": True, "max_translate": 0.125}]}


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, cpu=False, ce=False, global_weight=0.0, teacher="", steps=0,
                aug="", batch=0)
  a.aug = a.aug or ("weak" if a.cpu else "randaugment")
  if a.aug not in AUGS:
    raise ValueError(f"aug={a.aug!r}: one of {tuple(AUGS)}")
  c = mlc.ConfigDict()
  c.task = "fewshot"
  c.method = "ce" if a.ce else "scl"
  c.seed = 0
  c.total_steps = a.steps or (60 if a.tiny else 1000 if a.cpu else 30_000)
  c.log_every = 20 if a.tiny else 100
  c.ckpt_every = c.total_steps
  c.keep_ckpts = 1
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.input = mlc.ConfigDict()
  c.input.dataset = "shapes_fewshot/small" if a.tiny else "shapes_fewshot"
  c.input.data_dir = mlc.config_dict.placeholder(str)
  c.input.batch_size = a.batch or (16 if a.tiny else 32 if a.cpu else 64)
  c.input.views = 2
  c.input.num_threads = 1 if a.tiny else 2
  if AUGS[a.aug] is not None:
    c.input.transforms = AUGS[a.aug]
  c.input.mean = (0.5,)
  c.input.std = (0.25,)

  small = a.tiny or a.cpu
  c.model = mlc.ConfigDict({"name": "resnet12",
                            "widths": (8, 16, 32, 32) if a.tiny else
                            (16, 32, 64, 128) if a.cpu else (64, 160, 320, 640),
                            # 32x32 images: no pooling after the last block keeps a 4x4 map
                            "pool": (2, 2, 2, 1) if small else (2, 2, 2, 2),
                            # DropBlock's block: official 5 at 84x84, 2 at 32x32 (CIFAR-FS)
                            "dropblock_size": 2 if small else 5})
  c.fewshot = mlc.ConfigDict()
  # DropBlock reaches its rate after 75% of the run (official: 40,000 of ~54,000 steps)
  c.fewshot.dropblock_warmup_steps = max(1, int(0.75 * c.total_steps))
  if not a.ce:
    c.fewshot.spatial_weight = 1.0
    c.fewshot.global_weight = a.global_weight
    c.fewshot.temperature = 0.1
  if a.teacher:
    # the official distillation stage: one view, KD (T = 4) + 10 x feature distillation, no CE
    # and no contrastive term
    c.input.views = 1
    c.fewshot.teacher = a.teacher
    c.fewshot.update({"ce_weight": 0.0, "spatial_weight": 0.0, "global_weight": 0.0,
                      "kd_weight": 1.0, "kd_temperature": 4.0,
                      "feature_distill_weight": 10.0})

  # SGD with momentum as the official code; cosine instead of its step decay (a run of any
  # length)
  c.optim = mlc.ConfigDict({"name": "sgd", "lr": 0.05, "momentum": 0.9, "wd": 5e-4})
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine"})

  c.evals = mlc.ConfigDict()
  c.evals.fewshot = dict(type="fewshot", every=c.total_steps, split="test", batch_size=256,
                         features=("global", "spatial"), n_way=5, shots=(1, 5), queries=15,
                         episodes=100 if a.tiny else 600)
  if a.tiny:
    c.evals.fewshot["queries"] = 3  # shapes_fewshot/small has 8 images per test class
  return c
