"""The episodic few-shot evaluator (``bigvl.evaluators.fewshot``): the sampler is reproducible
from its seed and never leaks training classes, episodes have distinct support / query
images, the accuracy and its 95% interval are what the definition says, and an eval split that
shares classes with the train split is refused."""

from __future__ import annotations

import numpy as np
import pytest

from bigvl.config import ConfigError
from bigvl.data import sources, streams
from bigvl.data.builders import shapes_fewshot
from bigvl.evaluators import fewshot


def test_sampler_is_reproducible_and_never_leaks_training_classes(fewshot_data_dir):
  test, _ = sources.get_source("shapes_fewshot/small", "test", fewshot_data_dir)
  train, _ = sources.get_source("shapes_fewshot/small", "train", fewshot_data_dir)
  labels = streams.read_labels(test)
  train_classes = set(np.unique(streams.read_labels(train)).tolist())
  by_class = fewshot.class_index(labels)
  seen = set()
  for e in range(200):
    a = fewshot.sample_episode(by_class, 5, 1, 3, fewshot.episode_rng(0, 5, 1, e))
    b = fewshot.sample_episode(by_class, 5, 1, 3, fewshot.episode_rng(0, 5, 1, e))
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(x, y)
    sup, sup_y, qry, qry_y, classes = a
    picked = set(labels[np.concatenate([sup, qry])].tolist())
    assert picked == set(classes.tolist()) and not picked & train_classes
    assert len(set(sup) | set(qry)) == len(sup) + len(qry)  # distinct images
    np.testing.assert_array_equal(labels[sup], classes[sup_y])  # episode labels = positions
    np.testing.assert_array_equal(labels[qry], classes[qry_y])
    seen |= picked
  assert seen == set(shapes_fewshot.TEST_CLASSES)  # every test class gets drawn
  other = fewshot.sample_episode(by_class, 5, 1, 3, fewshot.episode_rng(1, 5, 1, 0))
  assert not all(np.array_equal(x, y) for x, y in zip(
      other, fewshot.sample_episode(by_class, 5, 1, 3, fewshot.episode_rng(0, 5, 1, 0)),
      strict=True))
  with pytest.raises(ValueError, match="needs 5 classes"):
    fewshot.sample_episode(by_class, 5, 6, 3, np.random.default_rng(0))  # 8 per class


def test_episode_accuracy_and_interval():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 20)
  centres = rng.normal(size=(10, 16)) * 5
  clean = {"f": centres[labels] + rng.normal(size=(200, 16)) * 0.1}
  for clf in fewshot.CLASSIFIERS:
    acc = fewshot.evaluate_episodes(clean, labels, n_way=5, k=1, queries=5, episodes=20, seed=0,
                                    classifier=clf)
    assert np.all(acc == 1.0)
  noise = {"f": rng.normal(size=(200, 16))}
  acc = fewshot.evaluate_episodes(noise, labels, n_way=5, k=1, queries=5, episodes=300, seed=0)
  mean, ci = fewshot.mean_ci95(acc)
  assert abs(mean - 0.2) < 3 * ci  # chance, within the interval's scale
  np.testing.assert_allclose(ci, 1.96 * np.std(acc) / np.sqrt(300))
  # summing two kinds' probabilities: a useless kind does not hide a perfect one
  both = fewshot.evaluate_episodes({**clean, "g": noise["f"]}, labels, n_way=5, k=5, queries=5,
                                   episodes=20, seed=0)
  assert both.mean() > 0.95


def test_eval_split_sharing_train_classes_is_refused(fewshot_data_dir):
  test, _ = sources.get_source("shapes_fewshot/small", "test", fewshot_data_dir)
  fewshot.check_disjoint(streams.read_labels(test), "shapes_fewshot/small", "train",
                         fewshot_data_dir, "label", "evals.fewshot")
  train, _ = sources.get_source("shapes_fewshot/small", "train", fewshot_data_dir)
  with pytest.raises(ConfigError, match="never seen in training"):
    fewshot.check_disjoint(streams.read_labels(train)[:10], "shapes_fewshot/small", "train",
                           fewshot_data_dir, "label", "evals.fewshot")
