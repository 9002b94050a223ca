"""Domain adaptation on the standard benchmarks, from image folders or prepared TFDS datasets
(bigvl never downloads them):

  python -m bigvl.main --config configs/da_benchmarks.py:benchmark=office31,source=amazon,\\
target=webcam,root=/data/office31,tc_cliv --workdir W

* ``office31``: ``root/<domain>/images/<class>/*.jpg`` (amazon, dslr, webcam; 31 classes);
* ``officehome``: ``root/<domain>/<class>/*`` (Art, Clipart, Product, Real_World; 65 classes);
* ``visda``: ``root/<domain>/<class>/*`` (train = synthetic renderings, validation = real
  photos; 12 classes);
* ``mnist_usps``: MNIST from TFDS (``tfds build mnist --file_format=array_record``) to USPS as
  an image folder ``root/usps/<digit>/*.png`` (or the reverse with ``source=usps``).

The protocol of DANN / CDAN: the whole target domain without labels for training, the same
images with labels for the ``target`` evaluator. ``method=``, ``tc``, ``cliv``, ``tc_cliv`` as
``configs/da_digits.py``. The model is a WRN-28-2 trained from scratch: the papers' numbers use
an ImageNet-pretrained ResNet-50, which bigvl cannot import yet, so expect lower accuracies.
"""

import ml_collections as mlc

from bigvl.config import load_sibling, parse_arg

BENCHMARKS = {
    # name: (image_size, domain -> dataset name given root, default source, default target)
    "office31": (224, lambda root, d: f"folder:{root}/{d}/images", "amazon", "webcam"),
    "officehome": (224, lambda root, d: f"folder:{root}/{d}", "Art", "Clipart"),
    "visda": (224, lambda root, d: f"folder:{root}/{d}", "train", "validation"),
    "mnist_usps": (28, lambda root, d: "mnist" if d == "mnist" else f"folder:{root}/{d}",
                   "mnist", "usps"),
}


def get_config(arg=None):
  a = parse_arg(arg, benchmark="office31", source="", target="", root="/data/da",
                method="cdan", tc=False, cliv=False, tc_cliv=False, steps=20_000, tiny=False)
  if a.benchmark not in BENCHMARKS:
    raise ValueError(f"benchmark={a.benchmark!r}: one of {', '.join(BENCHMARKS)}")
  size, dataset, src, tgt = BENCHMARKS[a.benchmark]
  flags = ",".join(f for f in ("tc", "cliv", "tc_cliv", "tiny") if a[f])
  c = load_sibling(__file__, "da_digits").get_config(
      f"method={a.method},steps={a.steps}" + (f",{flags}" if flags else ""))
  c.input.source = dict(dataset=dataset(a.root, a.source or src), split="train")
  c.input.target = dict(dataset=dataset(a.root, a.target or tgt), split="train")
  c.input.image_size = size
  c.input.channels = 1 if a.benchmark == "mnist_usps" else 3
  c.input.flip = a.benchmark != "mnist_usps"
  c.input.mean = (0.5,) if a.benchmark == "mnist_usps" else (0.485, 0.456, 0.406)
  c.input.std = (0.5,) if a.benchmark == "mnist_usps" else (0.229, 0.224, 0.225)
  c.model = mlc.ConfigDict({"name": "wide_resnet", "depth": 28, "width": 2})
  c.da.randomized = a.benchmark != "mnist_usps"  # CDAN's randomized map for large d * C
  c.da.random_dim = 1024
  c.optim = mlc.ConfigDict({"name": "sgd", "lr": 0.01, "momentum": 0.9, "wd": 5e-4,
                            "nesterov": True})
  c.evals.target.batch_size = 64
  c.evals.source.batch_size = 64
  c.evals.source.dataset = c.input.source.dataset
  c.evals.source.split = "train"
  c.evals.target.split = "train"  # the target's own images, with labels: the DA protocol
  return c
