"""Semi-supervised MNIST (the bundled 5k-image MNIST, ``embedded:mnist5k``) with 100 labels.

  python -m bigvl.main --config configs/semisup_mnist.py:fixmatch,tiny --workdir /tmp/bigvl/ssl

The arg names the method (``fixmatch`` or ``method=fixmatch``; see
``bigvl.tasks.semisup_methods``: supervised, pi_model, temporal_ensembling, mean_teacher, vat,
pseudo_label, entropy_min, mixmatch, uda, fixmatch), plus ``tiny`` (SmallCNN, a few minutes
on a 2-core CPU), ``num_labels=N`` (a multiple of 10), ``steps=N`` (override the number of
steps) and ``perturb=auto|paper|weak``: ``paper`` trains with the perturbations of Laine & Aila
2017 and Tarvainen & Valpola 2017 (:data:`PAPER_PERTURB`: translations of up to 2 pixels,
Gaussian input noise 0.15, dropout 0.5 after the downsampling stages), ``weak`` with the weak
augmentation alone (translations of up to 12.5%); ``auto`` (default) is ``paper`` for the
Pi-model, Temporal Ensembling and Mean Teacher and ``weak`` for the others (each method with
its own paper's). ``supervised,perturb=paper`` is the baseline with the same perturbations.
Without ``tiny`` (WRN-28-2, which has no pooling stages to put dropout after) ``paper`` sets the
translations and the noise only.
Without ``tiny``: WRN-28-2 and the FixMatch optimizer, sized for an accelerator.

The parts shared with ``semisup_cifar10.py`` and ``semisup_svhn.py`` are in
``semisup_base.py``. Mean Teacher gets a second evaluator, ``teacher`` (its EMA teacher).
"""

import ml_collections as mlc

from bigvl.config import ConfigError, load_sibling

_base = load_sibling(__file__, "semisup_base")


def get_config(arg=None):
  a = _base.parse(arg)
  tiny = a.tiny
  steps = a.steps or (TINY_STEPS if tiny else 2**16)
  c = _base.base(a.method, dataset="embedded:mnist5k", num_labels=a.num_labels,
                 total_steps=steps, batch_size=TINY_BATCH if tiny else 64, flip=False,
                 mean=(0.1307,), std=(0.3081,))
  # RandAugment without its photometric ops for natural images: on white-on-black digits
  # solarize erases the strokes (leaving outlines), contrast / brightness fade the digit into
  # a flat field and color does nothing on one channel (with them: the ablation table
  # docs/results/semisup_mnist_full_randaugment.md).
  c.input.strong_ops = DIGIT_OPS
  perturb = a.perturb if a.perturb != "auto" else (
      "paper" if a.method in PAPER_PERTURB_METHODS else "weak")
  if perturb not in ("paper", "weak"):
    raise ConfigError(f"config arg perturb={a.perturb!r}: one of auto, paper, weak")
  # VAT's eps is an L2 norm on normalised inputs: 2.0 in 0..1 pixel units (Miyato et al.'s
  # MNIST value) is ~6.5 after dividing by MNIST's std 0.31.
  if a.method == "vat":
    c.semisup.eps = 6.5
  if perturb == "paper":  # WRN-28-2 (no pooling stages) gets the translations and noise only
    c.input.max_translate = PAPER_PERTURB["max_translate"]
    c.input.noise_std = PAPER_PERTURB["noise_std"]
  if tiny:
    # 4 stages: a 17-pixel receptive field before the pooling (3 stages see only 9x9 patches
    # of a 28x28 digit).
    c.model = mlc.ConfigDict({"name": "small_cnn", "width": TINY_WIDTH, "stages": 4,
                              "bn_momentum": 0.99})
    c.input.num_threads = 1
    if perturb == "paper":
      c.model.stage_dropout = PAPER_PERTURB["stage_dropout"]
    if "mu" in c.semisup:
      c.semisup.mu = min(c.semisup.mu, TINY_MAX_MU)
    _base.scale_rampups(c, steps)
    if a.method == "mean_teacher":
      c.semisup.ema_decay = 0.99  # 0.999 averages over more steps than a tiny run has
    c.optim = mlc.ConfigDict({"name": "adamw", "lr": 3e-3, "wd": 1e-4})
    c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine", "end_frac": 0.2})
    _base.set_evals(c, every=steps, batch_size=1000)
  return c


#: Laine & Aila 2017 (Sec. 3 and App. A) and Tarvainen & Valpola 2017 (App. B): random
#: translations of up to 2 pixels (2 / 28 of an MNIST digit), additive Gaussian input noise of
#: std 0.15 (on normalised inputs) and dropout 0.5 after each pooling stage; no flips (digits).
PAPER_PERTURB = {"max_translate": 2 / 28, "noise_std": 0.15, "stage_dropout": 0.5}
PAPER_PERTURB_METHODS = ("pi_model", "temporal_ensembling", "mean_teacher")
DIGIT_OPS = ("identity", "autocontrast", "equalize", "rotate", "sharpness", "shear_x", "shear_y",
             "translate_x", "translate_y", "posterize")
TINY_STEPS = 1500
TINY_BATCH = 16
TINY_WIDTH = 16
TINY_MAX_MU = 2

