"""Scene-aware Recall@K: equals the standard recall when every scene is unique, and counts a
near duplicate's caption (or image) as a hit."""

import numpy as np

from bigvl.evaluators.retrieval import recall_at_k, scene_recall_at_k


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_unique_scenes_equal_standard_recall():
  rng = np.random.default_rng(0)
  zimg, ztxt = _unit(rng.normal(size=(20, 8))), _unit(rng.normal(size=(20, 3, 8)))
  std = recall_at_k(zimg, ztxt, (1, 5))
  scene = scene_recall_at_k(zimg, ztxt, np.arange(20) * 7, (1, 5))
  for k in (1, 5):
    assert scene[f"i2t_scene_R@{k}"] == std[f"i2t_R@{k}"]
    assert scene[f"t2i_scene_R@{k}"] == std[f"t2i_R@{k}"]


def test_duplicate_scene_is_a_hit():
  # Images 0 and 1 are duplicates (scene 5) with identical captions; image 2 is another scene.
  e = np.eye(4)
  zimg = np.stack([e[0], _unit(e[0] + 0.01 * e[3]), e[1]])
  ztxt = np.stack([e[[0]], e[[0]], e[[1]]])  # C = 1
  scene = np.array([5, 5, 9])
  std = recall_at_k(zimg, ztxt, (1,))
  sc = scene_recall_at_k(zimg, ztxt, scene, (1,))
  # Standard: the duplicate's identical caption ties with the own one -> images 0, 1 miss;
  # caption 1's best image is image 0 (not its own) -> a miss.
  assert std["i2t_R@1"] == 1 / 3 and std["t2i_R@1"] == 2 / 3
  assert sc["i2t_scene_R@1"] == 1.0 and sc["t2i_scene_R@1"] == 1.0
  # A caption of another scene ranked first is still a miss.
  sc = scene_recall_at_k(zimg, ztxt, np.array([5, 6, 9]), (1,))
  assert sc["i2t_scene_R@1"] == 1 / 3


def test_average_precision_matches_sklearn():
  from sklearn.metrics import average_precision_score

  from bigvl.evaluators.retrieval import average_precision

  rng = np.random.default_rng(1)
  scores = rng.normal(size=(30, 40))
  relevant = rng.random((30, 40)) < 0.2
  relevant[:, 0] = True  # every query has a relevant item
  ours = average_precision(scores, relevant)
  ref = [average_precision_score(relevant[q], scores[q]) for q in range(30)]
  np.testing.assert_allclose(ours, ref, rtol=1e-12)


def test_scene_map_rewards_ranking_every_equivalent_item():
  # Scene 0 has images 0, 1 (one caption each); scene 1 has image 2. Caption 0 ranks both
  # scene-0 images first: AP 1. If image 2 outranks image 1 for caption 0, AP = (1 + 2/3) / 2.
  e = np.eye(3)
  zimg = np.stack([e[0], _unit(e[0] + 0.2 * e[1]), e[2]])
  ztxt = _unit(np.stack([[e[0]], [e[0] + 0.1 * e[1]], [e[2]]]))
  out = scene_recall_at_k(zimg, ztxt, np.array([0, 0, 1]), (1,))
  assert out["t2i_scene_mAP"] == 1.0
  zimg_bad = np.stack([e[0], _unit(e[1] + 0.3 * e[0]), _unit(e[2] + 0.5 * e[0])])
  sims = zimg_bad @ ztxt.reshape(3, -1).T
  assert sims[2, 0] > sims[1, 0]  # image 2 outranks image 1 for caption 0
  out = scene_recall_at_k(zimg_bad, ztxt, np.array([0, 0, 1]), (1,))
  from bigvl.evaluators.retrieval import average_precision

  same = np.array([0, 0, 1])[:, None] == np.array([0, 0, 1])[None, :]
  assert average_precision(sims.T, same.T)[0] == (1 + 2 / 3) / 2
  assert out["t2i_scene_mAP"] < 1.0
