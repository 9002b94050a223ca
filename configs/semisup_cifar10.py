"""Semi-supervised CIFAR-10 with WRN-28-2 (the FixMatch / MixMatch / UDA benchmark).

  tfds build cifar10 --data_dir=$BIGVL_DATA --file_format=array_record   # once
  python -m bigvl.main --config configs/semisup_cifar10.py:fixmatch,num_labels=250 \\
      --workdir /tmp/bigvl/fixmatch_c10_250

Arg: the method (a bare word or ``method=...``), ``num_labels=40|250|4000`` (any multiple of
10; default 250), ``steps=N`` (default 2^20, FixMatch's schedule), ``tiny`` (a CPU smoke
run: SmallCNN, 200 steps). Labeled batch 64, ``mu`` from the method's paper; FixMatch's SGD
(lr 0.03, Nesterov, wd 5e-4, cosine). Needs the TFDS ``cifar10`` data prepared as ArrayRecord
under the data dir (no network at run time).
"""

from bigvl.config import load_sibling

_base = load_sibling(__file__, "semisup_base")


def get_config(arg=None):
  return _base.tfds_benchmark(arg, dataset="cifar10", flip=True,
                              mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
