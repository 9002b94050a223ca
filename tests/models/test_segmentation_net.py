"""The segmentation network (``bigvl.models.segmentation``): ResNet-50's backbone has
torchvision's parameter count, dilation replaces stride past the output stride, adaptive
pooling bins are PyTorch's, pixel shuffle has PyTorch's channel order, ICNR decoders start as
nearest-neighbour upsampling, and shapes come out at the input resolution."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl.config import ConfigError, Reader
from bigvl.models import segmentation as S


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_resnet50_backbone_has_torchvision_parameter_count():
  """torchvision's resnet50 has 25,557,032 parameters, 2,049,000 of them the fc layer: the
  conv + BN backbone is 23,508,032 (running statistics are buffers there, batch_stats here)."""
  net = S.SegmentationNet(num_classes=21)
  shapes = nn.meta.unbox(jax.eval_shape(functools.partial(net.init, train=False),
                                       jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  enc = shapes["params"]["encoder"]
  backbone = {k: v for k, v in enc.items() if k != "psp"}
  assert _count(backbone) == 23_508_032
  assert shapes["params"]["encoder"]["stage3_block0"]["conv3"]["kernel"].shape == (
      1, 1, 512, 2048)


def test_dilation_replaces_stride_past_the_output_stride():
  assert S.stage_geometry(4, 4, 8) == [(1, 1), (2, 1), (1, 2), (1, 4)]  # PSPNet / DeepLab
  assert S.stage_geometry(4, 4, 16) == [(1, 1), (2, 1), (2, 1), (1, 2)]
  assert S.stage_geometry(1, 3, 4) == [(1, 1), (2, 1), (2, 1)]
  net = S.Encoder(stage_sizes=(1, 1, 1, 1), block="basic", width=8, stem="imagenet",
                  output_stride=8, psp_bins=(1, 2), psp_features=16)
  z = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), jnp.zeros((2, 64, 48, 3)),
                                                  train=False)[0])
  assert z.shape == (2, 8, 6, 16)


def test_adaptive_pool_bins_match_pytorch():
  # torch.nn.AdaptiveAvgPool1d(3) over 5 inputs averages [0:2], [1:4], [3:5]
  m = S.adaptive_pool_matrix(5, 3)
  np.testing.assert_allclose(m, [[.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0],
                                 [0, 0, 0, .5, .5]], rtol=1e-6)
  np.testing.assert_allclose(S.adaptive_pool_matrix(8, 2).sum(1), 1.0)


def test_pixel_shuffle_has_pytorch_channel_order():
  b, h, w, c, r = 2, 3, 4, 5, 2
  x = np.random.default_rng(0).normal(size=(b, h, w, c * r * r)).astype(np.float32)
  out = np.asarray(S.pixel_shuffle(jnp.asarray(x), r))
  for ch in range(c):
    for i in range(r):
      for j in range(r):
        np.testing.assert_array_equal(out[:, i::r, j::r, ch], x[..., ch * r * r + i * r + j])


def test_icnr_decoder_starts_as_nearest_upsampling_and_keeps_resolution():
  dec = S.UpsamplingDecoder(num_classes=3, upscale=4)
  z = jax.random.normal(jax.random.key(0), (2, 5, 6, 8))
  out, params = dec.init_with_output(jax.random.key(1), z)
  assert out.shape == (2, 20, 24, 3) and out.dtype == jnp.float32
  # every 4x4 block of the output is constant: nearest-neighbour upsampling at init
  blocks = np.asarray(out).reshape(2, 5, 4, 6, 4, 3)
  np.testing.assert_allclose(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape),
                             atol=1e-6)


def test_net_outputs_logits_at_input_resolution_with_every_decoder():
  net = S.SegmentationNet(num_classes=5, num_aux=3, stage_sizes=(1, 1, 1), block="basic",
                          width=8, stem="small", output_stride=4, psp_bins=(1, 2),
                          psp_features=16)
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(functools.partial(net.init, train=False), jax.random.key(0), x)
  assert {"aux0", "aux1", "aux2", "main", "encoder"} <= set(variables["params"])
  out = jax.eval_shape(functools.partial(net.apply, train=False), variables, x)
  assert out.shape == (2, 16, 16, 5) and out.dtype == jnp.float32
  z = jax.eval_shape(functools.partial(net.apply, train=False, method="encode"), variables, x)
  assert z.shape == (2, 4, 4, 16)
  aux = jax.eval_shape(lambda v, z: net.apply(v, z, 2, method="decode_aux"), variables, z)
  assert aux.shape == (2, 16, 16, 5)


@pytest.mark.parametrize("bad,match", [({"output_stride": 6}, "power of 2"),
                                       ({"stem": "small", "output_stride": 16,
                                         "stage_sizes": (1, 1)}, "not reachable"),
                                       ({"block": "wide"}, "block")])
def test_from_config_errors(bad, match):
  with pytest.raises(ConfigError, match=match):
    S.from_config(Reader({"name": "segmentation", **bad}, "config.model"), num_classes=3)
