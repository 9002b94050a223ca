"""Semi-supervised SVHN (``svhn_cropped``, 73,257 train digits) with WRN-28-2.

  tfds build svhn_cropped --data_dir=$BIGVL_DATA --file_format=array_record   # once
  python -m bigvl.main --config configs/semisup_svhn.py:fixmatch,num_labels=250 \\
      --workdir /tmp/bigvl/fixmatch_svhn_250

Arg: the method, ``num_labels=40|250|1000`` (default 250), ``steps=N`` (2^20), ``tiny``.
As CIFAR-10 (``semisup_cifar10.py``) but no horizontal flip (FixMatch's SVHN augmentation:
translations only) and SVHN's mean / std.
"""

from bigvl.config import load_sibling

_base = load_sibling(__file__, "semisup_base")


def get_config(arg=None):
  return _base.tfds_benchmark(arg, dataset="svhn_cropped", flip=False,
                              mean=(0.4377, 0.4438, 0.4728), std=(0.1980, 0.2010, 0.1970))
