"""Spatial Contrastive Learning (``bigvl.tasks.fewshot``, method ``scl``), its cross-entropy
baseline (``ce``) and the distillation stage (``teacher=``) on the four standard few-shot
benchmarks, with the official SCL code's settings (github.com/yassouali/SCL: ``scripts/run.sh``,
``train_contrastive.py``, ``train_distillation.py``, ``dataset/*.py``, ``models/util.py``;
bigvl never downloads the data):

  python -m bigvl.main --config configs/fewshot_benchmarks.py:benchmark=mini,root=/data/mini \\
      --workdir W
  python -m bigvl.main --config configs/fewshot_benchmarks.py:benchmark=mini,root=/data/mini,\\
teacher=W --workdir W_distill

Benchmarks (:data:`BENCHMARKS`):

* ``mini`` -- miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle 2017
  (their ``train.csv`` / ``val.csv`` / ``test.csv``: 64 / 16 / 20 classes of ImageNet, 600
  images each), as an image folder ``root/{train,val,test}/<wnid>/*.jpg`` (``folder:<root>``,
  ``bigvl/data/folders.py``: one sub-folder per class, the class names sorted are the labels
  of that split). Export every ``(filename, wnid)`` row of a CSV to ``root/<split>/<wnid>/``;
  images of any size are resized to 84x84 (``input.image_size``; the RFS / SCL pickles hold
  them at 84x84 already). 38,400 training images.
* ``tiered`` -- tieredImageNet (Ren et al. 2018): 351 / 97 / 160 classes (20 / 6 / 8 ImageNet
  super-categories), 448,695 / 124,261 / 206,209 images at 84x84, the same folder layout
  ``root/{train,val,test}/<class>/*`` (e.g. the ``{train,val,test}_images.npz`` +
  ``*_labels.pkl`` of RFS / SCL written out as PNGs, one sub-folder per label).
* ``cifar_fs`` -- CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 classes of CIFAR-100
  (:data:`CIFAR_FS`, as names of TFDS ``cifar100``'s ``label``).
* ``fc100`` -- FC100 (Oreshkin et al. 2018, TADAM): CIFAR-100 split by superclass, 12 / 4 / 4
  superclasses = 60 / 20 / 20 classes (:data:`FC100_SUPERCLASSES`, :data:`FC100`).

  Both CIFAR benchmarks read TFDS ``cifar100`` (prepared once, offline:
  ``tfds build cifar100 --file_format=array_record``; ``root=`` is then its data dir, else
  the default one). The base classes (``input.classes``) train from its ``train`` split and
  the novel (and validation) classes are evaluated on its ``test`` split. **Deviation:** the
  official CIFAR-FS / FC100 pickles hold all 600 images of a class (CIFAR's train + test);
  here base classes have their 500 train images, novel / validation classes their 100 test
  images (enough for 5-way 5-shot episodes with 15 queries).

Official settings, as used here (file:line of github.com/yassouali/SCL at e40409d):

* ResNet-12 of widths 64-160-320-640, dropout / DropBlock rate 0.1, DropBlock block 5 at
  84x84 and 2 at 32x32 (``models/util.py:13,22``); DropBlock's rate annealed over 40,000
  steps (``models/resnet.py:141``, the task's default); max-pooling after every block
  (CIFAR: a 2x2 final map).
* SGD, momentum 0.9, no Nesterov, weight decay 5e-4, batch 64 (``train_contrastive.py:30,
  40-44,211``); lr 0.05 for pre-training and 0.01 for distillation (``scripts/run.sh``).
  PyTorch adds the weight decay to the gradient *before* momentum, bigvl's SGD adds it to the
  update after it (decoupled, ``bigvl/optim.py``): ``optim.wd = 5e-4 / (1 - 0.9) = 5e-3`` is
  the same decay in the steady state, on every parameter as in PyTorch (``wd_mask``).
* Epochs and lr decay epochs (``scripts/run.sh``): mini 90 (60, 80), tiered 60 (30, 40, 50),
  CIFAR-FS and FC100 90 (45, 60, 75), the same for distillation; decay by 0.1
  (``train_contrastive.py:42``, ``utils.py:24-30``). **Deviation:** bigvl's schedules are
  cosine / linear / poly / rsqrt / constant (``bigvl/optim.py``), no step decay: cosine from
  the lr to ``lr * 1e-3`` (the official code's own ``--cosine`` option,
  ``train_contrastive.py:233-235``) over the official number of steps.
* Steps: the loader drops the last partial batch (``dataset/loaders.py:46``), so an epoch is
  ``floor(images / 64)`` steps: mini 600 x 90 = 54,000; tiered 7,010 x 60 = 420,600; CIFAR-FS
  600 x 90 = 54,000; FC100 562 x 90 = 50,580 (:func:`total_steps`). For the CIFAR benchmarks
  these are the official *steps* (of 600 images / class); over TFDS's 500 / class they are
  108 (CIFAR-FS) and 101 (FC100) epochs.
* Losses (``scripts/run.sh``): CE 1 + spatial contrastive 1 (CIFAR-FS: 0.5 + 0.5), inverse
  temperature 10 (tau 0.1), projection size 80 (``train_contrastive.py:72-81``); distillation
  KD 1 (T 4) + 10 x feature distillation, no CE, one view (``train_distillation.py:60-63``,
  ``double_transform`` off).
* Normalisation: ImageNet-style mean / std of the RFS pickles for mini / tiered, CIFAR-100's
  for CIFAR-FS / FC100 (``dataset/transform_cfg.py:15-16,42-43``).
* Evaluation: 5-way 1- and 5-shot, 15 queries, 600 episodes, logistic regression on the
  L2-normalised global and 2x2 max-pooled spatial features, probabilities summed
  (``scripts/run.sh``, ``eval/meta_eval.py``). **Deviation:** the official evaluation also
  adds 5 augmented copies of each support image (``n_aug_support_samples``); bigvl does not.

**Deviation (augmentation):** the official pre-training views are ``RandomCrop`` (padding 8 at
84, 4 at 32) + ``ColorJitter(0.4, 0.4, 0.4)`` + flip, and a SimCLR view (random resized crop,
colour jitter, grayscale); bigvl has no colour-jitter / resized-crop op and applies one
pipeline to each view: both are ``strong`` (flip, a translation of up to the official padding,
two RandAugment ops of the full set, no Cutout, :func:`view_ops`).

The ``ce`` baseline (RFS) uses the same two views, steps and optimizer with CE weight 1 (the
official baseline sees one view: ``--config.input.views=1``). ``teacher=W``: the distillation
stage from a finished run ``W`` of the same benchmark (a fresh student; ``ce`` or not only
names the run). ``tiny``: a narrow ResNet-12, 60 steps of batch 16, 100 episodes, the cheap
``weak`` view: a CPU check of the pipeline on the real data. ``root``: the image-folder root
(mini / tiered; default ``/data/<name>``) or the TFDS data dir (CIFAR).
"""

import ml_collections as mlc

from bigvl.config import parse_arg

BATCH = 64  # train_contrastive.py:30, scripts/run.sh

BENCHMARKS = {
    # name: dict(official training images, base classes, epochs, lr decay epochs (the official
    #            step decay; cosine here), image size, DropBlock size, CE / spatial weights)
    "mini": dict(images=38_400, classes=64, epochs=90, decay_epochs=(60, 80), size=84,
                 dropblock=5, weights=(1.0, 1.0), root="/data/miniImageNet"),
    "tiered": dict(images=448_695, classes=351, epochs=60, decay_epochs=(30, 40, 50), size=84,
                   dropblock=5, weights=(1.0, 1.0), root="/data/tieredImageNet"),
    "cifar_fs": dict(images=64 * 600, classes=64, epochs=90, decay_epochs=(45, 60, 75),
                     size=32, dropblock=2, weights=(0.5, 0.5), root=""),
    "fc100": dict(images=60 * 600, classes=60, epochs=90, decay_epochs=(45, 60, 75), size=32,
                  dropblock=2, weights=(1.0, 1.0), root=""),
}
#: (mean, std) in 0..1 units: dataset/transform_cfg.py:15-16 (RFS's miniImageNet pickles, also
#: used for tieredImageNet) and :42-43 (CIFAR-100)
IMAGENET_MEAN_STD = ((120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255),
                     (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255))
CIFAR_MEAN_STD = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))

#: CIFAR-100's fixed superclasses (coarse labels) and their five fine classes, as TFDS
#: ``cifar100`` names them (``coarse_label`` / ``label``; www.cs.toronto.edu/~kriz/cifar.html)
CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant",
                                       "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

#: CIFAR-FS (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers"):
#: the split of their repository (github.com/bertinetto/r2d2, data/cifar100/splits/bertinetto),
#: as torchmeta ships it (github.com/tristandeleu/pytorch-meta,
#: torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json); sorted names
CIFAR_FS = {
    "train": (
        "apple", "aquarium_fish", "bear", "bee", "bottle", "bowl", "boy", "bridge", "bus", "can",
        "castle", "caterpillar", "chair", "clock", "cloud", "cockroach", "couch", "cup",
        "dinosaur", "dolphin", "elephant", "forest", "girl", "hamster", "house", "kangaroo",
        "keyboard", "lawn_mower", "lion", "lizard", "lobster", "mountain", "mouse", "mushroom",
        "oak_tree", "orange", "orchid", "palm_tree", "pear", "pine_tree", "plate", "porcupine",
        "possum", "rabbit", "raccoon", "ray", "road", "seal", "shrew", "skunk", "skyscraper",
        "snake", "spider", "squirrel", "streetcar", "sunflower", "tank", "tiger", "train",
        "trout", "tulip", "turtle", "willow_tree", "wolf"),
    "val": (
        "beaver", "beetle", "butterfly", "camel", "cattle", "crab", "crocodile", "flatfish",
        "lamp", "maple_tree", "motorcycle", "otter", "sea", "shark", "television", "tractor"),
    "test": (
        "baby", "bed", "bicycle", "chimpanzee", "fox", "leopard", "man", "pickup_truck", "plain",
        "poppy", "rocket", "rose", "snail", "sweet_pepper", "table", "telephone", "wardrobe",
        "whale", "woman", "worm"),
}

#: FC100 (Oreshkin et al. 2018, "TADAM", Sec. 4.1): superclasses (CIFAR-100 coarse ids) 1, 2,
#: 3, 4, 5, 6, 9, 10, 15, 17, 18, 19 train, 8, 11, 13, 16 val, 0, 7, 12, 14 test; by name as
#: torchmeta ships it (torchmeta/datasets/assets/cifar100/fc100/{train,val,test}.json)
FC100_SUPERCLASSES = {
    "train": ("fish", "flowers", "food_containers", "fruit_and_vegetables",
              "household_electrical_devices", "household_furniture",
              "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles", "trees",
              "vehicles_1", "vehicles_2"),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates",
            "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}
#: FC100's fine classes: every class of its superclasses (sorted names)
FC100 = {split: tuple(sorted(c for s in supers for c in CIFAR100_SUPERCLASSES[s]))
         for split, supers in FC100_SUPERCLASSES.items()}
CLASS_SPLITS = {"cifar_fs": CIFAR_FS, "fc100": FC100}


def steps_per_epoch(benchmark: str) -> int:
  """``floor(official training images / 64)``: the official loader drops the last partial
  batch (``dataset/loaders.py:46``)."""
  return BENCHMARKS[benchmark]["images"] // BATCH


def total_steps(benchmark: str) -> int:
  """The official run's optimizer steps: ``epochs * steps_per_epoch``."""
  return BENCHMARKS[benchmark]["epochs"] * steps_per_epoch(benchmark)


def view_ops(benchmark: str, tiny: bool = False) -> list[dict]:
  """One view's augmentation: flip + a translation of up to the official ``RandomCrop``
  padding (8 px at 84, 4 at 32), then (not ``tiny``) two RandAugment ops of the full set in
  place of the official colour jitter / SimCLR view, no Cutout."""
  b = BENCHMARKS[benchmark]
  shift = (8 if b["size"] == 84 else 4) / b["size"]
  if tiny:
    return [{"op": "weak", "flip": True, "max_translate": shift}]
  return [{"op": "strong", "flip": True, "max_translate": shift, "num_ops": 2,
           "cutout_max_fraction": 0.0}]


def get_config(arg=None):
  a = parse_arg(arg, benchmark="mini", ce=False, teacher="", tiny=False, root="")
  if a.benchmark not in BENCHMARKS:
    raise ValueError(f"benchmark={a.benchmark!r}: one of {', '.join(BENCHMARKS)}")
  b = BENCHMARKS[a.benchmark]
  cifar = a.benchmark in CLASS_SPLITS
  distill = bool(a.teacher)
  epoch = steps_per_epoch(a.benchmark)

  c = mlc.ConfigDict()
  c.task = "fewshot"
  c.method = "ce" if a.ce else "scl"
  c.seed = 0
  c.total_steps = 60 if a.tiny else total_steps(a.benchmark)
  c.log_every = 20 if a.tiny else 100
  c.ckpt_every = c.total_steps if a.tiny else 10 * epoch
  c.keep_ckpts = 2
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.input = mlc.ConfigDict()
  if cifar:
    c.input.dataset = "cifar100"
    c.input.data_dir = a.root or mlc.config_dict.placeholder(str)
    c.input.train_split = "train"
    c.input.classes = CLASS_SPLITS[a.benchmark]["train"]  # the base classes, by name
  else:
    c.input.dataset = f"folder:{a.root or b['root']}"
    c.input.data_dir = mlc.config_dict.placeholder(str)
    c.input.train_split = "train"
  c.input.image_size = b["size"]
  c.input.batch_size = 16 if a.tiny else BATCH
  c.input.views = 1 if distill else 2
  c.input.num_threads = 1 if a.tiny else 8
  c.input.transforms = view_ops(a.benchmark, a.tiny)
  c.input.mean, c.input.std = CIFAR_MEAN_STD if cifar else IMAGENET_MEAN_STD

  c.model = mlc.ConfigDict({"name": "resnet12",
                            "widths": (8, 16, 32, 32) if a.tiny else (64, 160, 320, 640),
                            "pool": (2, 2, 2, 2), "drop_rate": 0.1,
                            "dropblock_size": b["dropblock"]})

  c.fewshot = mlc.ConfigDict()
  # official: the DropBlock rate reaches 0.1 after 40,000 forward passes (models/resnet.py:141)
  c.fewshot.dropblock_warmup_steps = max(1, int(0.75 * c.total_steps)) if a.tiny else 40_000
  if distill:
    # train_distillation.py + run.sh: KD (T = 4) + 10 x feature distillation, no CE, one view
    c.fewshot.teacher = a.teacher
    c.fewshot.update({"ce_weight": 0.0, "spatial_weight": 0.0, "global_weight": 0.0,
                      "kd_weight": 1.0, "kd_temperature": 4.0,
                      "feature_distill_weight": 10.0})
  elif not a.ce:
    c.fewshot.ce_weight, c.fewshot.spatial_weight = b["weights"]
    c.fewshot.global_weight = 0.0
    c.fewshot.temperature = 0.1  # --temperature_s 10 is an inverse temperature
    c.fewshot.proj_dim = 80

  # official SGD (no Nesterov); PyTorch's coupled L2 5e-4 under momentum 0.9 = decoupled
  # 5e-3, on every parameter (module docstring)
  momentum = 0.9
  c.optim = mlc.ConfigDict({"name": "sgd", "lr": 0.01 if distill else 0.05,
                            "momentum": momentum, "nesterov": False,
                            "wd": 5e-4 / (1 - momentum), "wd_mask": (".",)})
  # cosine in place of the official step decay by 0.1 at b["decay_epochs"]
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "cosine", "end_frac": 1e-3})

  c.evals = mlc.ConfigDict()
  common = dict(type="fewshot", batch_size=256, features=("global", "spatial"), n_way=5,
                shots=(1, 5), queries=15, episodes=100 if a.tiny else 600)
  if cifar:
    split = CLASS_SPLITS[a.benchmark]
    c.evals.fewshot = dict(common, every=c.total_steps, split="test", classes=split["test"])
    c.evals.val = dict(common, every=c.total_steps if a.tiny else 10 * epoch, split="test",
                       classes=split["val"])
  else:
    # the evaluator checks by class (folder) name that no test / val class is a train class
    c.evals.fewshot = dict(common, every=c.total_steps, split="test")
    c.evals.val = dict(common, every=c.total_steps if a.tiny else 10 * epoch, split="val")
  return c
