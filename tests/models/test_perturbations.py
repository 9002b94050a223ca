"""Each CCT perturbation has its defining property (``bigvl.models.perturbations``), and the
I-VAT direction (the shared VAT power iteration, on features) increases the main decoder's
divergence more than a random direction of the same norm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bigvl.losses import consistency as C
from bigvl.models import perturbations as P


def _z(shape=(3, 6, 7, 5), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) + 1.0


def _pred():
  """Two examples, background 0 with class-1 and class-3 boxes in the first, class 2 in the
  second."""
  p = np.zeros((2, 10, 12), np.int32)
  p[0, 1:6, 2:8] = 1
  p[0, 7:10, 9:12] = 3
  p[1, 2:9, 3:11] = 2
  return jnp.asarray(p)


def test_context_and_object_masking_keep_only_their_part():
  z, pred = _z((2, 10, 12, 4)), _pred()
  obj = np.asarray(pred > 0)[..., None]
  ctx = np.asarray(P.context_masking(z, pred))
  bg = np.asarray(P.object_masking(z, pred))
  np.testing.assert_array_equal(ctx, np.where(obj, z, 0))  # objects kept, context zero
  np.testing.assert_array_equal(bg, np.where(obj, 0, z))  # context kept, objects zero
  np.testing.assert_array_equal(ctx + bg, np.asarray(z))  # complementary


def test_guided_cutout_erases_a_box_inside_each_predicted_object():
  pred = _pred()
  masks = jax.jit(jax.vmap(lambda k: P.cutout_mask(pred, k, num_classes=5, erase=0.4)))(
      jax.random.split(jax.random.key(0), 20))
  for m in np.asarray(masks):
    assert set(np.unique(m)) <= {0.0, 1.0}
    # every erased pixel lies inside the bounding box of some predicted class
    for b in range(2):
      erased = m[b] == 0
      inside = np.zeros_like(erased)
      sizes = []
      for c in range(1, 5):
        ys, xs = np.nonzero(np.asarray(pred[b]) == c)
        if len(ys):
          inside[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
          sizes.append(int((ys.max() - ys.min()) * 0.4) * int((xs.max() - xs.min()) * 0.4))
      assert not np.any(erased & ~inside)
      assert erased.sum() == sum(sizes)  # boxes of different objects do not overlap here
  z = _z((2, 10, 12, 3))
  m = P.cutout_mask(pred, jax.random.key(0), 5, 0.4)
  np.testing.assert_array_equal(np.asarray(P.guided_cutout(z, pred, jax.random.key(0), 5)),
                                np.asarray(z * m[..., None]))
  assert float(jnp.min(P.cutout_mask(jnp.zeros_like(pred), jax.random.key(0), 5))) == 1.0


def test_feature_dropout_drops_the_most_activated_region():
  z = _z((4, 8, 8, 6), seed=1)
  out = np.asarray(P.feature_dropout(z, jax.random.key(0)))
  attention = np.asarray(jnp.mean(z, -1))
  for b in range(4):
    dropped = np.all(out[b] == 0, axis=-1)
    kept = ~dropped
    assert dropped.any() and kept.any()
    assert attention[b][dropped].min() >= attention[b][kept].max()  # a top-attention set
    assert attention[b].argmax() in np.flatnonzero(dropped.reshape(-1))
    # the threshold is between 0.7 and 0.9 of the peak
    peak = attention[b].max()
    assert attention[b][kept].max() < 0.9 * peak and attention[b][dropped].min() >= 0.7 * peak
  np.testing.assert_array_equal(out[np.any(out != 0, -1)], np.asarray(z)[np.any(out != 0, -1)])


def test_spatial_dropout_drops_whole_channels_and_keeps_the_mean():
  z = jnp.ones((64, 4, 4, 16))
  out = np.asarray(P.spatial_dropout(z, jax.random.key(0), 0.5))
  per_channel = out.transpose(0, 3, 1, 2).reshape(64, 16, -1)
  assert np.all((per_channel == 0).all(-1) | (per_channel == 2.0).all(-1))  # whole channels
  assert abs(out.mean() - 1.0) < 0.1  # inverted dropout keeps the expectation
  assert 0.4 < (per_channel[..., 0] == 0).mean() < 0.6


def test_feature_noise_is_multiplicative_uniform_and_shared_by_the_batch():
  z = _z((3, 5, 5, 4), seed=2)
  out = np.asarray(P.feature_noise(z, jax.random.key(3), 0.3))
  ratio = out / np.asarray(z) - 1.0
  assert np.all(np.abs(ratio) <= 0.3 + 1e-5) and ratio.std() > 0.05
  np.testing.assert_allclose(ratio[0], ratio[1], atol=1e-5)  # one noise tensor per batch


def test_vat_direction_on_features_beats_a_random_direction():
  """I-VAT: ``r_adv`` (power iteration through a decoder) increases KL(main(z) ||
  main(z + r)) more than random directions of the same norm."""
  kw, kd = jax.random.split(jax.random.key(0))
  w = jax.random.normal(kw, (6, 5)) * 2.0

  def decode(z):
    return jnp.tanh(z) @ w

  z = jax.random.normal(kd, (4, 3, 3, 6))
  p = jax.nn.softmax(decode(z), -1)

  def kl(r):
    return np.asarray(jnp.sum(C.kl_divergence(p, decode(z + r)), axis=(1, 2)))

  r_adv = C.vat_perturbation(decode, z, jax.random.key(1), xi=1e-6, eps=2.0)
  norms = np.sqrt(np.sum(np.asarray(r_adv) ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(norms, 2.0, rtol=1e-3)
  adv = kl(r_adv)
  for seed in range(5):
    r = jax.random.normal(jax.random.key(10 + seed), z.shape)
    r = 2.0 * r / jnp.sqrt(jnp.sum(r**2, axis=(1, 2, 3), keepdims=True))
    assert np.all(adv > kl(r))


def test_labels_at_takes_the_pixel_under_each_cell_centre():
  logits = jax.nn.one_hot(jnp.arange(64).reshape(1, 8, 8) % 5, 5)
  out = np.asarray(P.labels_at(logits, (2, 4)))
  want = (np.arange(64).reshape(8, 8) % 5)[2::4, 1::2]
  np.testing.assert_array_equal(out[0], want)
