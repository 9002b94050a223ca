"""Semi-supervised MNIST (the bundled 5k-image MNIST, ``embedded:mnist5k``) with 100 labels.

  python -m bigvl.main --config configs/semisup_mnist.py:fixmatch,tiny --workdir /tmp/bigvl/ssl

The arg names the method (``fixmatch`` or ``method=fixmatch``; see ``bigvl.tasks.semisup``:
supervised, pi_model, temporal_ensembling, mean_teacher, vat, pseudo_label, entropy_min,
mixmatch, uda, fixmatch), plus ``tiny`` (SmallCNN, a few minutes on a 2-core CPU),
``num_labels=N`` (a multiple of 10) and ``steps=N`` (override the number of steps). Without
``tiny``: WRN-28-2 and the FixMatch optimizer, sized for an accelerator.

:func:`base` is shared with ``semisup_cifar10.py`` and ``semisup_svhn.py``.
"""

import ml_collections as mlc

from bigvl.config import parse_arg
from bigvl.tasks import semisup

ARG_DEFAULTS = dict(method="fixmatch", tiny=False, num_labels=100, steps=0)


def parse(arg):
  """``'fixmatch,tiny'`` / ``'method=fixmatch,tiny'`` -> parsed args (a bare method word is
  the method)."""
  items = [f"method={x}" if x in semisup.METHODS else x for x in (arg or "").split(",") if x]
  return parse_arg(",".join(items), **ARG_DEFAULTS)


def base(method, *, dataset, num_labels, total_steps, batch_size, flip, mean, std):
  """The config every semisup experiment shares: WRN-28-2 + FixMatch's SGD recipe."""
  c = mlc.ConfigDict()
  c.task = "semisup"
  c.method = method
  c.seed = 0
  c.total_steps = total_steps
  c.log_every = max(1, min(500, total_steps // 20))
  c.ckpt_every = max(1, min(10_000, total_steps // 4))
  c.keep_ckpts = 2
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.partition_rules = ()  # a 1.5M-parameter model: data parallel, parameters replicated

  c.semisup = mlc.ConfigDict(semisup.default_hparams(method))

  c.input = mlc.ConfigDict()
  c.input.dataset = dataset
  c.input.data_dir = mlc.config_dict.placeholder(str)  # None: $BIGVL_DATA / ~/tensorflow_datasets
  c.input.train_split = "train"
  c.input.num_labels = num_labels
  c.input.label_seed = mlc.config_dict.placeholder(int)  # None: config.seed
  c.input.batch_size = batch_size  # labeled; unlabeled = semisup.mu * batch_size
  c.input.num_threads = 2
  c.input.flip = flip
  c.input.max_translate = 0.125
  c.input.mean = mean
  c.input.std = std

  c.model = mlc.ConfigDict({"name": "wide_resnet", "depth": 28, "width": 2,
                            "bn_momentum": 0.999})

  # FixMatch: SGD, Nesterov momentum 0.9, lr 0.03, weight decay 5e-4, lr * cos(7 pi k / 16 K)
  # (ends at ~0.2 lr: a cosine to end_frac 0.2 is close).
  c.optim = mlc.ConfigDict({"name": "sgd", "lr": 0.03, "momentum": 0.9, "nesterov": True,
                            "wd": 5e-4})
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine", "end_frac": 0.2})

  c.evals = mlc.ConfigDict()
  c.evals.test = dict(type="classification", every=max(1, total_steps // 4), split="test",
                      batch_size=500)
  return c


def scale_rampups(c, total_steps, fraction=0.4):
  """Short runs: the ramp-ups the papers give in steps of 1M-step runs become a fraction of
  this run."""
  if c.semisup.get("rampup_steps"):
    c.semisup.rampup_steps = max(1, int(fraction * total_steps))


def get_config(arg=None):
  a = parse(arg)
  tiny = a.tiny
  steps = a.steps or (TINY_STEPS if tiny else 2**16)
  c = base(a.method, dataset="embedded:mnist5k", num_labels=a.num_labels, total_steps=steps,
           batch_size=TINY_BATCH if tiny else 64, flip=False, mean=(0.1307,), std=(0.3081,))
  # RandAugment without its photometric ops for natural images: on white-on-black digits
  # solarize erases the strokes (leaving outlines), contrast / brightness fade the digit into
  # a flat field and color does nothing on one channel (docs/semisup.md: with them FixMatch
  # and UDA lose 3-5 points of test error at 1,000 tiny steps).
  c.input.strong_ops = DIGIT_OPS
  # VAT's eps is an L2 norm on normalised inputs: 2.0 in 0..1 pixel units (Miyato et al.'s
  # MNIST value) is ~6.5 after dividing by MNIST's std 0.31.
  if a.method == "vat":
    c.semisup.eps = 6.5
  if tiny:
    # 4 stages: a 17-pixel receptive field before the pooling (3 stages see only 9x9 patches
    # of a 28x28 digit: 31% vs 15% test error with 100 labels, supervised, 500 steps).
    c.model = mlc.ConfigDict({"name": "small_cnn", "width": TINY_WIDTH, "stages": 4,
                              "bn_momentum": 0.99})
    c.input.num_threads = 1
    if "mu" in c.semisup:
      c.semisup.mu = min(c.semisup.mu, TINY_MAX_MU)
    scale_rampups(c, steps)
    if a.method == "mean_teacher":
      c.semisup.ema_decay = 0.99  # 0.999 averages over more steps than a tiny run has
    c.optim = mlc.ConfigDict({"name": "adamw", "lr": 3e-3, "wd": 1e-4})
    c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine", "end_frac": 0.2})
    c.evals.test.every = steps
    c.evals.test.batch_size = 1000
  return c


DIGIT_OPS = ("identity", "autocontrast", "equalize", "rotate", "sharpness", "shear_x", "shear_y",
             "translate_x", "translate_y", "posterize")
TINY_STEPS = 1500
TINY_BATCH = 16
TINY_WIDTH = 16
TINY_MAX_MU = 2


def tfds_benchmark(arg, *, dataset, flip, mean, std):
  """The CIFAR-10 / SVHN benchmark config (WRN-28-2, labeled batch 64, 2^20 steps); ``tiny``
  swaps in SmallCNN for a 200-step CPU smoke run."""
  a = parse(arg or "")
  num_labels = 250 if "num_labels=" not in (arg or "") else a.num_labels
  steps = a.steps or (200 if a.tiny else 2**20)
  c = base(a.method, dataset=dataset, num_labels=num_labels, total_steps=steps,
           batch_size=64, flip=flip, mean=mean, std=std)
  if a.tiny:
    c.model = mlc.ConfigDict({"name": "small_cnn", "width": 16, "stages": 4})
    c.input.batch_size = 16
    if "mu" in c.semisup:
      c.semisup.mu = min(c.semisup.mu, 2)
    scale_rampups(c, steps)
    c.evals.test.every = steps
  return c
