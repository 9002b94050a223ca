"""LFA (black-box linear feature alignment, ``bigvl.tasks.lfa``) of a SigLIP two-tower model
trained on ``shapes_captions`` (flat shapes on a dark background), adapted to
``shapes_fewshot/shifted`` (textured shapes on textured backgrounds: a shifted domain) for the
24 "<colour> <shape>" classes its text tower can name.

Step 1, the two-tower model (any finished ``siglip_shapes`` run)::

  python -m bigvl.main --config configs/siglip_shapes.py:tiny --workdir /tmp/bigvl/siglip

Step 2, this config: features of the shifted domain (``bigvl.tools.extract_features``)::

  python -m bigvl.main --config configs/lfa_shapes.py:two_tower=/tmp/bigvl/siglip \\
      --workdir /tmp/bigvl/lfa_features

Step 3, LFA on the features alone (black box; ``bigvl.lfa``)::

  python -m bigvl.lfa --train /tmp/bigvl/lfa_features/features/train.npz \\
      --test /tmp/bigvl/lfa_features/features/test.npz --shots 1 2 4 8 16 --seeds 0 1 2

Args: ``two_tower=`` (the step-1 workdir), ``tiny`` (the ``siglip_shapes:tiny`` architecture and
``shapes_fewshot/shifted_small``), ``size=`` (the two-tower's size arg, default ``tiny``: it must
match the run of step 1).
"""

import ml_collections as mlc

from bigvl.config import load_sibling, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, two_tower="", size="tiny")
  c = load_sibling(__file__, "siglip_shapes").get_config(a.size or None)
  c.evals = mlc.ConfigDict()
  c.tool = "extract_features"
  c.init_from = mlc.ConfigDict({"two_tower": dict(
      path=a.two_tower or mlc.config_dict.placeholder(str))})
  c.extract = mlc.ConfigDict()
  c.extract.dataset = "shapes_fewshot/shifted_small" if a.tiny else "shapes_fewshot/shifted"
  c.extract.splits = ("train", "test")
  # the (colour, shape) class, named as shapes_captions names it; texture is the domain shift
  c.extract.label_key = "object_label"
  c.extract.templates = ("a {}", "a picture of a {}")
  c.extract.lfa_dataset = mlc.config_dict.placeholder(str)  # one of bigvl.data.lfa_datasets
  c.extract.batch_size = 256
  return c
