"""Cross-Consistency Training on the real benchmarks, from list files (``pairs:<root>``,
``bigvl/data/pairs.py``; bigvl never downloads them):

  python -m bigvl.main --config configs/cct_benchmarks.py:benchmark=voc,root=/data/VOC2012 \\
      --workdir W

The defaults are the official CCT code's (``configs/config.json``): PSP head on a dilated
ResNet-50 (output stride 8), 30 auxiliary decoders (I-VAT 2 with xi 1e-6 / eps 2.0, DropOut 6
at 0.5, G-Cutout 6 erasing 0.4, Con-Msk 2, Obj-Msk 2, F-Drop 6, F-Noise 6 uniform 0.3),
unsupervised weight 30 ramped over the first 10% of training, weak-label weight 0.4 (with
``weak``), SGD lr 1e-2 (the backbone at lr / 10: ``diff_lrs``), momentum 0.9, weight decay
1e-4, poly schedule, 10 labeled + 10 unlabeled crops a step (crop 160 of images whose longer
side is scaled to 200 x U(0.5, 2.0), flipped). The paper reports 69.4 mIoU on Pascal VOC with
1,464 labels (73.2 with image-level labels) from an ImageNet-pretrained ResNet-50: name that
backbone with ``config.init_from`` (a bigvl run; bigvl has no torchvision importer yet), or
expect lower numbers from scratch.

Benchmarks (the list files to put under ``root``, each line ``image [mask]``):

* ``voc``: Pascal VOC 2012 + SBD (``SegmentationClassAug``), 21 classes:
  ``1464_train_supervised.txt`` (the 1,464 labeled images), ``1464_train_unsupervised.txt``
  (the other 9,118 of the augmented set, image paths only), ``val.txt`` (1,449);
* ``cityscapes``: ``*_gtFine_labelTrainIds.png`` masks, 19 classes: ``train_supervised.txt``,
  ``train_unsupervised.txt``, ``val.txt``;
* ``cocostuff``: COCO-Stuff-164k with the 171 used labels remapped to 0-170, 171 classes;
* ``potsdam``: ISPRS Potsdam tiles with RGB label images (``palette.json``), 6 classes.

``tiny`` swaps in the tiny network of ``cct_shapes.py`` (a CPU check of the pipeline);
``supervised`` trains the baseline (labeled images only); ``weak`` adds the weak-label term
(``bigvl.tasks.cct``) with image-level labels read from the unlabeled lines' masks
(``classes_present``: the unlabeled list then names a mask per image, e.g. VOC's
``SegmentationClassAug``, of which only the set of classes is used); ``steps=N``.
Evaluation resizes every validation image and mask to ``eval_size`` (square; the official code
evaluates at full resolution).
"""

import ml_collections as mlc

from bigvl.config import load_sibling, parse_arg

BENCHMARKS = {
    # name: (classes, labeled split, unlabeled split, val split, crop, base size, eval size)
    "voc": (21, "1464_train_supervised", "1464_train_unsupervised", "val", 160, 200, 320),
    "cityscapes": (19, "train_supervised", "train_unsupervised", "val", 512, 1024, 512),
    "cocostuff": (171, "train_supervised", "train_unsupervised", "val", 321, 400, 321),
    "potsdam": (6, "train_supervised", "train_unsupervised", "val", 256, 256, 256),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(arg=None):
  a = parse_arg(arg, benchmark="voc", root="/data/VOC2012", supervised=False, weak=False,
                steps=0, tiny=False)
  if a.benchmark not in BENCHMARKS:
    raise ValueError(f"benchmark={a.benchmark!r}: one of {', '.join(BENCHMARKS)}")
  classes, lab, unl, val, crop, base, eval_size = BENCHMARKS[a.benchmark]
  c = load_sibling(__file__, "cct_shapes").get_config(
      "supervised" if a.supervised else None)
  c.total_steps = a.steps or 60_000  # ~65 epochs of VOC's 9,118 unlabeled images at 10
  c.log_every, c.ckpt_every, c.keep_ckpts = 100, 2000, 3
  c.input = mlc.ConfigDict()
  c.input.dataset = f"pairs:{a.root}"
  c.input.data_dir = mlc.config_dict.placeholder(str)
  c.input.labeled_split = lab
  c.input.num_classes = classes
  c.input.ignore_label = 255
  c.input.image_size = eval_size
  c.input.batch_size = 10
  c.input.num_threads = 8
  c.input.mean, c.input.std = IMAGENET_MEAN, IMAGENET_STD
  train_ops = [{"op": "random_scale_crop", "crop": crop, "base_size": base,
                "scale": (0.5, 2.0), "keys": ["image", "mask"]},
               {"op": "random_flip", "keys": ["image", "mask"]},
               {"op": "keep", "keys": ["image", "mask"]}]
  c.input.transforms = train_ops
  if not a.supervised:
    c.input.unlabeled_split = unl
    c.input.unlabeled_batch_size = 10
    c.input.unlabeled_transforms = [
        *([{"op": "classes_present", "num_classes": classes}] if a.weak else []),
        {**train_ops[0], "keys": ["image"]}, {"op": "random_flip"},
        {"op": "keep", "keys": ["image", "weak"] if a.weak else ["image"]}]
    c.cct.aux = load_sibling(__file__, "cct_shapes").aux_counts("all", None)
    c.cct.weak_weight = 0.4 if a.weak else 0.0
  c.model = mlc.ConfigDict({"name": "segmentation", "stage_sizes": (3, 4, 6, 3),
                            "block": "bottleneck", "width": 64, "stem": "imagenet",
                            "output_stride": 8, "psp_bins": (1, 2, 3, 6),
                            "psp_features": 512})
  if a.tiny:  # the pipeline on a CPU: the tiny network, one decoder per perturbation
    c.model = load_sibling(__file__, "cct_shapes").get_config("tiny").model
    c.total_steps = a.steps or 200
    if not a.supervised:
      c.cct.aux = load_sibling(__file__, "cct_shapes").aux_counts("all", 1)
  c.optim = mlc.ConfigDict({"name": "sgd", "lr": 1e-2, "momentum": 0.9, "nesterov": False,
                            "wd": 1e-4, "lr_mults": ((r"^encoder/(stem|stage)", 0.1),)})
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "poly"})
  c.evals = mlc.ConfigDict()
  c.evals.val = dict(type="segmentation", every=5000, split=val, batch_size=8,
                     num_overlays=8)
  return c
