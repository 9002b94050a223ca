"""False-negative mining finds exactly the planted near duplicates / equivalent captions."""

import jax
import jax.numpy as jnp
import numpy as np

from bigvl.losses.contrastive import positives_from_owners
from bigvl.losses.mining import mine_positives

N, K, D = 8, 2, 64
M = N * K


def _crafted_batch(seed=0):
  """8 images x 2 captions, nearly orthogonal, with planted pairs and below-threshold decoys.

  Images live in dims 0..31, texts in dims 32..63 (so cross-modal cosines are ~0) except where
  planted; every vector gets ~1e-2 noise. Owners: text j belongs to image j // 2.
  Planted (cosine ~0.995): images 2 ~ 5; texts 2 (image 1) ~ 12 (image 6);
  image 0 ~ text 7 (image 3) at cosine ~0.8.
  Decoys: images 3 ~ 4 and texts 0 ~ 10 at ~0.90 (< 0.95), image 1 ~ text 9 at ~0.40 (< 0.5).
  """
  rng = np.random.default_rng(seed)
  e = np.eye(D)
  img = np.stack([e[i] for i in range(N)])
  txt = np.stack([e[32 + j] for j in range(M)])
  img[5] = e[2] + 0.1 * e[20]       # planted near-duplicate of image 2
  img[4] = e[3] + 0.48 * e[21]      # decoy, cos(img3, img4) ~ 0.90
  txt[12] = e[32 + 2] + 0.1 * e[60]  # planted: equivalent to text 2
  txt[10] = e[32 + 0] + 0.48 * e[61]  # decoy, cos(txt0, txt10) ~ 0.90
  txt[7] = 0.8 * e[0] + 0.6 * e[32 + 7]  # planted image-text match with image 0
  txt[9] = 0.4 * e[1] + 0.917 * e[32 + 9]  # decoy, cos(img1, txt9) ~ 0.40
  img = img + 0.01 * rng.normal(size=img.shape)
  txt = txt + 0.01 * rng.normal(size=txt.shape)
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  owners = np.repeat(np.arange(N), K).astype(np.int32)
  return img.astype(np.float32), txt.astype(np.float32), owners


PLANTED = {
    "ii": {(2, 10), (2, 11), (5, 4), (5, 5)},  # image 2 <-> texts of image 5 and vice versa
    "tt": {(1, 12), (6, 2)},  # image 1 gets text 12, image 6 gets text 2
    "it": {(0, 7)},
}


def _pairs(mask):
  return {(int(i), int(j)) for i, j in zip(*np.nonzero(np.asarray(mask)), strict=True)}


def test_mining_finds_exactly_the_planted_pairs():
  img, txt, owners = _crafted_batch()
  res = jax.jit(mine_positives)(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(owners))
  base = np.array(positives_from_owners(np.arange(N), owners))
  np.testing.assert_array_equal(res.base, base)
  planted = set().union(*PLANTED.values())
  assert _pairs(np.asarray(res.positives) - base) == planted
  assert _pairs(res.positives) == _pairs(base) | planted
  assert int(res.num_mined) == len(planted) == 7
  assert (int(res.num_ii), int(res.num_tt), int(res.num_it)) == (4, 2, 1)


def test_each_test_alone():
  img, txt, owners = _crafted_batch(1)
  base = _pairs(positives_from_owners(np.arange(N), owners))
  off = dict(thr_ii=None, thr_tt=None, thr_it=None)
  for name, key in (("ii", "thr_ii"), ("tt", "thr_tt"), ("it", "thr_it")):
    kw = dict(off)
    kw.pop(key)  # this test at its default threshold, the others disabled
    res = mine_positives(img, txt, owners, **kw)
    assert _pairs(res.positives) - base == PLANTED[name], name
  res = mine_positives(img, txt, owners, **off)
  assert _pairs(res.positives) == base and int(res.num_mined) == 0


def test_thresholds_move_decoys_in():
  img, txt, owners = _crafted_batch(2)
  res = mine_positives(img, txt, owners, thr_ii=0.85, thr_tt=0.85, thr_it=0.35)
  mined = _pairs(np.asarray(res.positives) - np.asarray(res.base))
  decoys = {(3, 8), (3, 9), (4, 6), (4, 7),  # images 3 ~ 4
            (0, 10), (5, 0),  # text 10 (image 5) ~ text 0 (image 0)
            (1, 9)}  # image 1 ~ text 9
  assert mined == set().union(*PLANTED.values()) | decoys


def test_text_without_owner():
  img, txt, owners = _crafted_batch(3)
  owners = owners.copy()
  owners[12] = -1  # text 12 is now nobody's: no base positive, no tt positive through it
  res = mine_positives(img, txt, owners)
  assert np.asarray(res.base)[:, 12].sum() == 0
  assert _pairs(np.asarray(res.positives) - np.asarray(res.base)) == (
      PLANTED["ii"] | PLANTED["it"] | {(1, 12)})  # image 1 still gets text 12 (equiv. to text 2)


def test_traced_thresholds_under_jit():
  img, txt, owners = _crafted_batch(4)
  fn = jax.jit(lambda a, c, o, thr: mine_positives(a, c, o, thr_ii=thr, thr_tt=thr).num_mined)
  assert int(fn(img, txt, owners, jnp.float32(0.95))) == 7
  assert int(fn(img, txt, owners, jnp.float32(0.85))) == 7 + 6  # + the ii and tt decoys


def test_group_positives_and_quality():
  from bigvl.losses.mining import group_positives, mining_quality, owner_mask, same_group

  groups = jnp.array([3, 7, 3, 5, 7], jnp.int32)
  owners = jnp.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1], jnp.int32)  # K = 2, one orphan
  truth = np.asarray(same_group(groups, owners))
  g = np.asarray(groups)
  o = np.asarray(owners)
  ref = np.array([[o[j] >= 0 and g[i] == g[o[j]] for j in range(len(o))] for i in range(5)])
  np.testing.assert_array_equal(truth, ref)
  res = group_positives(groups, owners)
  base = np.asarray(owner_mask(5, owners)[0])
  np.testing.assert_array_equal(np.asarray(res.positives) > 0, ref | base)
  # pairs 0~2 and 1~4, two texts each way: 8 mined pairs
  assert int(res.num_mined) == 8
  # A miner that finds half the true pairs plus two false ones: precision 4/6, recall 4/8.
  extra = ref & ~base
  found = np.zeros_like(extra)
  found[0, 4:6] = True   # image 0 <- texts of image 2 (true)
  found[1, 8:10] = True  # image 1 <- texts of image 4 (true)
  found[3, 0:2] = True   # image 3 <- texts of image 0 (false)
  p, r = mining_quality(jnp.asarray(found), jnp.asarray(ref), jnp.asarray(base))
  assert abs(float(p) - 4 / 6) < 1e-6 and abs(float(r) - 4 / 8) < 1e-6
