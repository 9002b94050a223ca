"""Semi-supervised SVHN (``svhn_cropped``, 73,257 train digits) with WRN-28-2.

  tfds build svhn_cropped --data_dir=$BIGVL_DATA --file_format=array_record   # once
  python -m bigvl.main --config configs/semisup_svhn.py:fixmatch,num_labels=250 \\
      --workdir /tmp/bigvl/fixmatch_svhn_250

Arg: the method, ``num_labels=40|250|1000`` (default 250), ``steps=N`` (2^20), ``tiny``.
As CIFAR-10 (``semisup_cifar10.py``) but no horizontal flip (FixMatch's SVHN augmentation:
translations only) and SVHN's mean / std.
"""

import ml_collections as mlc

from bigvl.config import load_sibling

_mnist = load_sibling(__file__, "semisup_mnist")


def get_config(arg=None):
  a = _mnist.parse(arg or "")
  num_labels = 250 if "num_labels=" not in (arg or "") else a.num_labels
  steps = a.steps or (200 if a.tiny else 2**20)
  c = _mnist.base(a.method, dataset="svhn_cropped", num_labels=num_labels, total_steps=steps,
                  batch_size=64, flip=False, mean=(0.4377, 0.4438, 0.4728),
                  std=(0.1980, 0.2010, 0.1970))
  if a.tiny:
    c.model = mlc.ConfigDict({"name": "small_cnn", "width": 16, "stages": 4})
    c.input.batch_size = 16
    if "mu" in c.semisup:
      c.semisup.mu = min(c.semisup.mu, 2)
    _mnist.scale_rampups(c, steps)
    c.evals.test.every = steps
  return c
