"""The config every semi-supervised experiment shares (``semisup_mnist.py``,
``semisup_cifar10.py``, ``semisup_svhn.py`` load it with ``bigvl.config.load_sibling``); not
an experiment itself.

:func:`base`: WRN-28-2 + FixMatch's SGD recipe, the method's knobs from its unit in
``bigvl.tasks.semisup_methods``; :func:`set_evals`: test accuracy / error, and for Mean Teacher
a second evaluator ``teacher`` on its EMA teacher; :func:`tfds_benchmark`: CIFAR-10 / SVHN.
"""

import ml_collections as mlc

from bigvl.config import ConfigError, parse_arg
from bigvl.tasks import semisup_methods

ARG_DEFAULTS = dict(method="fixmatch", tiny=False, num_labels=100, steps=0, perturb="auto")


def parse(arg):
  """``'fixmatch,tiny'`` / ``'method=fixmatch,tiny'`` -> parsed args (a bare method word is
  the method)."""
  items = [f"method={x}" if x in semisup_methods.METHODS else x
           for x in (arg or "").split(",") if x]
  return parse_arg(",".join(items), **ARG_DEFAULTS)


def set_evals(c, *, every, batch_size):
  """``evals.test``: accuracy / error of the trained model on the test split; for Mean
  Teacher also ``evals.teacher``: the same for its EMA teacher (``predict_fn=
  'teacher_logits'``; results ``teacher/accuracy``, ``teacher/error``)."""
  c.evals = mlc.ConfigDict()
  c.evals.test = dict(type="classification", every=every, split="test", batch_size=batch_size)
  if c.method == "mean_teacher":
    c.evals.teacher = dict(c.evals.test, predict_fn="teacher_logits")


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
  # A 1.5M-parameter model: data parallel, parameters replicated (no logical axis mapped).
  c.logical_axis_rules = ()

  c.semisup = mlc.ConfigDict(semisup_methods.default_hparams(method))

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

  set_evals(c, every=max(1, total_steps // 4), batch_size=512)  # divisible by 8 devices
  return c


def scale_rampups(c, total_steps, fraction=0.4):
  """Short runs: the ramp-ups the papers give in steps of 1M-step runs become a fraction of
  this run."""
  if c.semisup.get("rampup_steps"):
    c.semisup.rampup_steps = max(1, int(fraction * total_steps))


def tfds_benchmark(arg, *, dataset, flip, mean, std):
  """The CIFAR-10 / SVHN benchmark config (WRN-28-2, labeled batch 64, 2^20 steps); ``tiny``
  swaps in SmallCNN for a 200-step CPU smoke run."""
  a = parse(arg or "")
  if a.perturb != "auto":
    raise ConfigError("config arg perturb is a knob of configs/semisup_mnist.py (the papers' "
                      "digit perturbations); the CIFAR-10 / SVHN configs keep each method's "
                      "own augmentation")
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
    set_evals(c, every=steps, batch_size=512)
  return c


def get_config(arg=None):
  raise ConfigError("configs/semisup_base.py is the shared base of semisup_mnist.py, "
                    "semisup_cifar10.py and semisup_svhn.py, not an experiment")
