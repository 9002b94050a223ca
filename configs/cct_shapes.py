"""Cross-Consistency Training (``bigvl.tasks.cct``) on the synthetic ``shapes_segmentation``
scenes: 5% of the train images labeled, the rest unlabeled.

  python -m bigvl.main --config configs/cct_shapes.py:tiny --workdir /tmp/bigvl/cct

Args: ``tiny`` (a small dilated ResNet + PSP at 32x32, one auxiliary decoder per perturbation:
minutes on a 2-core CPU); ``supervised`` (the baseline: the same model and labeled images, no
unlabeled data); ``aux=`` a ``+``-joined subset of the perturbations (``vat``, ``dropout``,
``cutout``, ``context_mask``, ``object_mask``, ``feature_drop``, ``feature_noise``) or a
group: ``feature`` (vat + dropout + feature_drop + feature_noise), ``prediction`` (cutout +
context_mask + object_mask); ``num_labels=N``; ``steps=N``. Without ``tiny``: the official
decoder counts (30) and a wider network, sized for an accelerator.
"""

import ml_collections as mlc

from bigvl.config import parse_arg

KINDS = ("vat", "dropout", "cutout", "context_mask", "object_mask", "feature_drop",
         "feature_noise")
GROUPS = {"all": KINDS, "feature": ("vat", "dropout", "feature_drop", "feature_noise"),
          "prediction": ("cutout", "context_mask", "object_mask")}
OFFICIAL_AUX = {"vat": 2, "dropout": 6, "cutout": 6, "context_mask": 2, "object_mask": 2,
                "feature_drop": 6, "feature_noise": 6}


def aux_counts(spec: str, per_kind: int | None) -> dict[str, int]:
  """``config.cct.aux`` for ``spec`` (a group or ``+``-joined kinds): the official counts, or
  ``per_kind`` decoders of each chosen kind; the others 0."""
  chosen = GROUPS.get(spec) or tuple(spec.split("+"))
  bad = sorted(set(chosen) - set(KINDS))
  if bad:
    raise ValueError(f"aux={spec!r}: unknown perturbations {bad}; known: {', '.join(KINDS)} "
                     f"or groups {', '.join(GROUPS)}")
  return {k: (OFFICIAL_AUX[k] if per_kind is None else per_kind) if k in chosen else 0
          for k in KINDS}


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, supervised=False, aux="all", num_labels=200, steps=0)
  c = mlc.ConfigDict()
  c.task = "cct"
  c.method = "supervised" if a.supervised else "cct"
  c.seed = 0
  c.total_steps = a.steps or (1500 if a.tiny else 40_000)
  c.log_every = 100 if a.tiny else 500
  c.ckpt_every = c.total_steps
  c.keep_ckpts = 1
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.input = mlc.ConfigDict()
  c.input.dataset = "shapes_segmentation"
  c.input.data_dir = mlc.config_dict.placeholder(str)
  c.input.labeled_split = "train"
  c.input.num_labels = a.num_labels  # of 4,000 train images: 5%
  c.input.num_classes = 5
  c.input.image_size = 32
  c.input.batch_size = 16 if a.tiny else 32
  if not a.supervised:
    c.input.unlabeled_batch_size = c.input.batch_size
  c.input.num_threads = 1 if a.tiny else 2
  c.input.flip = True
  c.input.max_translate = 0.125
  c.input.mean = (0.5,)
  c.input.std = (0.25,)

  if a.tiny:
    c.model = mlc.ConfigDict({"name": "segmentation", "stage_sizes": (1, 1, 1),
                              "block": "basic", "width": 16, "stem": "small",
                              "output_stride": 4, "psp_bins": (1, 2, 4), "psp_features": 64,
                              # a 32-channel sub-pixel path: with 5 classes the official
                              # decoder's (num_classes channels) limits every model here
                              "decoder_channels": 32})
  else:
    c.model = mlc.ConfigDict({"name": "segmentation", "stage_sizes": (2, 2, 2),
                              "block": "basic", "width": 64, "stem": "small",
                              "output_stride": 4, "psp_bins": (1, 2, 4),
                              "psp_features": 256})
  if not a.supervised:
    c.cct = mlc.ConfigDict()
    c.cct.aux = aux_counts(a.aux, 1 if a.tiny else None)
    c.cct.unsup_weight = 30.0
    c.cct.rampup_fraction = 0.1

  c.optim = mlc.ConfigDict({"name": "adamw", "lr": 2e-3, "wd": 1e-4})
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine", "end_frac": 0.05})
  c.evals = mlc.ConfigDict()
  c.evals.test = dict(type="segmentation", every=c.total_steps, split="test", batch_size=256,
                      class_names=("background", "circle", "square", "triangle", "star"),
                      num_overlays=6)
  return c
