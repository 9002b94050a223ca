"""CLIP (softmax / InfoNCE loss) on ``shapes_captions``: siglip_shapes with the loss swapped.

  python -m bigvl.main --config configs/clip_shapes.py:tiny --workdir /tmp/bigvl/clip
"""

from bigvl.config import load_sibling


def get_config(arg=None):
  c = load_sibling(__file__, "siglip_shapes").get_config(arg)
  c.loss.name = "softmax"
  c.model.bias_init = 0.0  # unused by the softmax loss; t' = log 10 as CLIP's init scale
  return c
