"""Autoregressive unsupervised segmentation (``bigvl.tasks.ar_seg``) of the synthetic
``shapes_segmentation/textures`` scenes (each class a fill pattern, colours random: only local
texture tells the classes apart): no label is read in training; the test split's masks score
the clusters after Hungarian matching.

  python -m bigvl.main --config configs/arseg_shapes.py:tiny --workdir /tmp/bigvl/arseg

Args: ``tiny`` (a 5-layer masked-conv network, minutes on a 2-core CPU); ``single`` (the
ablation: one ordering, so both views are the same output and only the displacement window
relates them); ``objective=`` clustering (AC, default) | representation (ARL) | both;
``steps=N``. Evaluators: ``test`` (the unmasked network, as the paper infers) and
``test_ensemble`` (the masked networks of every training ordering, probabilities averaged).
"""

import ml_collections as mlc

from bigvl.config import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, tiny=False, single=False, objective="clustering", steps=0)
  c = mlc.ConfigDict()
  c.task = "ar_seg"
  c.seed = 0
  c.total_steps = a.steps or (1500 if a.tiny else 30_000)
  c.log_every = 100 if a.tiny else 500
  c.ckpt_every = c.total_steps
  c.keep_ckpts = 1
  c.mesh = mlc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

  c.input = mlc.ConfigDict()
  c.input.dataset = "shapes_segmentation/textures"  # the classes are patterns, colour random
  c.input.data_dir = mlc.config_dict.placeholder(str)
  c.input.split = "train"
  c.input.image_size = 32
  c.input.batch_size = 16 if a.tiny else 64
  c.input.num_threads = 1 if a.tiny else 2
  c.input.flip = True
  c.input.mean = (0.5,)
  c.input.std = (0.25,)

  c.model = mlc.ConfigDict({"name": "masked_conv", "width": 32 if a.tiny else 64,
                            "dilations": (1, 1, 2, 2, 1) if a.tiny else (1, 1, 2, 2, 4, 1),
                            "feature_dim": 32 if a.tiny else 64})
  c.ar = mlc.ConfigDict()
  c.ar.objective = a.objective
  c.ar.num_clusters = 5  # = the classes (background + 4 shapes): Hungarian matching is 1-1
  c.ar.orderings = (0,) if a.single else tuple(range(8))
  c.ar.max_shift = 1
  c.ar.color_jitter = 1.0  # each view its own colours: clusters must rest on the patterns
  c.ar.invert = 0.5  # ... and its own light / dark (the patterns are invariant to inversion)

  c.optim = mlc.ConfigDict({"name": "adam", "lr": 1e-3})
  c.schedule = mlc.ConfigDict({"warmup_steps": 0, "decay": "constant"})
  names = ("background", "circle", "square", "triangle", "star")
  c.evals = mlc.ConfigDict()
  for name, fn in (("test", "clusters"), ("test_ensemble", "clusters_ensemble")):
    c.evals[name] = dict(type="segmentation", every=c.total_steps, split="test",
                         batch_size=256, predict_fn=fn, hungarian=True, num_classes=5,
                         class_names=names, num_overlays=6 if name == "test" else 0)
  return c
