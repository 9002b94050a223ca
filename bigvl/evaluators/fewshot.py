"""Few-shot classification by episodes on classes never seen in training (the protocol of
Vinyals et al. 2016 as used by RFS, Tian et al. 2020, and SCL, Ouali et al. 2021).

The frozen network embeds every image of the eval split once (the prediction functions named
in ``features``). An *episode* of ``n_way`` classes, ``k`` shots and ``queries`` queries per
class draws ``n_way`` of the split's classes and, per class, ``k + queries`` distinct images
(support first); a classifier is fitted on the ``n_way * k`` support features and predicts the
queries. With several feature kinds (SCL: ``('global', 'spatial')``) one classifier is fitted
per kind and their class probabilities are summed (the official SCL ``aggregation='sum'`` of
``predict_proba``). Reported per ``k`` in ``shots``:
``acc_<n>way_<k>shot`` (mean query accuracy over ``episodes`` episodes) and
``ci95_<n>way_<k>shot = 1.96 std / sqrt(episodes)``, the half-width of the 95% confidence
interval of that mean, as the few-shot literature reports it.

Classifiers (``classifier``): ``'logistic'`` -- scikit-learn's multinomial L2 logistic
regression (lbfgs, ``C``, ``max_iter=1000``), the RFS / SCL evaluation, on L2-normalised
features (``normalize``); ``'nearest_centroid'`` -- cosine to the support mean (ProtoNet's
rule, a cheap check).

Episodes are reproducible: episode ``e`` with ``k`` shots draws from
``np.random.default_rng([seed, n_way, k, e])``, independent of the model and of how many
episodes run, so two checkpoints are compared on exactly the same episodes (paired).
Classes are never leaked: episodes draw only classes of the eval split, and with
``disjoint_from`` (default ``'train'``) the evaluator refuses (ConfigError) an eval split that
shares a class with that split of the same dataset.

Config (``config.evals.<name>``): ``type='fewshot'``, ``every``, ``dataset`` (default: the
task's), ``split`` (``'test'``), ``batch_size`` (256), ``label_key`` (``'label'``),
``features`` (``('global',)``), ``n_way`` (5), ``shots`` (``(1, 5)``), ``queries`` (15),
``episodes`` (600), ``seed`` (0), ``classifier`` (``'logistic'``), ``C`` (1.0), ``normalize``
(True), ``classes`` (the novel classes, label ids or names, when the split holds more:
CIFAR-FS / FC100 take theirs from CIFAR-100's test split), ``disjoint_from`` (``'train'``
without ``classes``, else None; None or '': no check; classes are compared by name where
both splits have names, e.g. image folders).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import sources, streams
from bigvl.data.labels import class_ids, class_subset
from bigvl.evaluators._embedding import predict_split
from bigvl.evaluators._split import read_eval_split
from bigvl.tasks.base import EvalView

CLASSIFIERS = ("logistic", "nearest_centroid")


def class_index(labels: np.ndarray) -> dict[int, np.ndarray]:
  """``{class: indices of its examples}`` (sorted classes, indices ascending)."""
  return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def sample_episode(by_class: Mapping[int, np.ndarray], n_way: int, k: int, queries: int,
                   rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One episode: ``(support [n_way k], support_y, query [n_way queries], query_y, classes
  [n_way])``: example indices and episode labels ``0..n_way-1`` (position in ``classes``).
  Classes are drawn without replacement among those with at least ``k + queries`` examples;
  per class ``k + queries`` distinct examples, the first ``k`` the support."""
  eligible = sorted(c for c, idx in by_class.items() if len(idx) >= k + queries)
  if len(eligible) < n_way:
    raise ValueError(f"{n_way}-way {k}-shot with {queries} queries needs {n_way} classes with "
                     f">= {k + queries} examples; the split has {len(eligible)}")
  classes = rng.choice(eligible, n_way, replace=False)
  sup, qry = [], []
  for c in classes:
    pick = rng.choice(by_class[int(c)], k + queries, replace=False)
    sup.append(pick[:k])
    qry.append(pick[k:])
  ways = np.arange(n_way)
  return (np.concatenate(sup), np.repeat(ways, k), np.concatenate(qry), np.repeat(ways, queries),
          np.asarray(classes))


def episode_rng(seed: int, n_way: int, k: int, episode: int) -> np.random.Generator:
  """The generator of one episode (module docstring: reproducible, paired across models)."""
  return np.random.default_rng([seed, n_way, k, episode])


def _l2(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def fit_predict(support: np.ndarray, support_y: np.ndarray, query: np.ndarray,
                classifier: str = "logistic", C: float = 1.0) -> np.ndarray:
  """Class probabilities ``[Q, n_way]`` of the queries from a classifier fitted on the
  support (nearest centroid: the softmax of 10 x the cosines)."""
  n_way = int(support_y.max()) + 1
  if classifier == "nearest_centroid":
    protos = _l2(np.stack([support[support_y == c].mean(0) for c in range(n_way)]))
    z = 10.0 * (_l2(query) @ protos.T)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
  from sklearn.linear_model import LogisticRegression

  clf = LogisticRegression(C=C, max_iter=1000, random_state=0)
  clf.fit(support, support_y)
  return clf.predict_proba(query)


def evaluate_episodes(features: Mapping[str, np.ndarray], labels: np.ndarray, *, n_way: int,
                      k: int, queries: int, episodes: int, seed: int,
                      classifier: str = "logistic", C: float = 1.0, normalize: bool = True
                      ) -> np.ndarray:
  """Per-episode query accuracy ``[episodes]`` (probabilities of every feature kind
  summed)."""
  feats = {n: (_l2(f) if normalize else f).astype(np.float64) for n, f in features.items()}
  by_class = class_index(labels)
  acc = np.empty(episodes)
  for e in range(episodes):
    sup, sup_y, qry, qry_y, _ = sample_episode(by_class, n_way, k, queries,
                                               episode_rng(seed, n_way, k, e))
    probs = sum(fit_predict(f[sup], sup_y, f[qry], classifier, C) for f in feats.values())
    acc[e] = np.mean(np.argmax(probs, -1) == qry_y)
  return acc


def mean_ci95(acc: np.ndarray) -> tuple[float, float]:
  """``(mean, 1.96 std / sqrt(n))``."""
  return float(acc.mean()), float(1.96 * acc.std() / np.sqrt(len(acc)))


class Evaluator:
  def __init__(self, cfg: Reader, task: EvalView, mesh: Mesh):
    self.mesh = mesh
    task.require_kind("image_label", cfg.path)
    split = read_eval_split(cfg, task, mesh)
    self.batch_size, self.source = split.batch_size, split.source
    self.label_key = cfg.typed("label_key", str, "label")
    self._transform = task.eval_transform("image_label", label_key=self.label_key)
    names = tuple(cfg.typed("features", (list, tuple), ("global",)))
    if not names:
      raise ConfigError(f"{cfg.path}.features: name at least one prediction function")
    self._fns = {n: jax.jit(task.predict_fn(n, f"{cfg.path}.features")) for n in names}
    self.n_way = positive_int(cfg, "n_way", 5)
    self.shots = tuple(int(k) for k in cfg.typed("shots", (list, tuple), (1, 5)))
    if not self.shots or min(self.shots) < 1:
      raise ConfigError(f"{cfg.path}.shots must be positive integers, got {self.shots}")
    self.queries = positive_int(cfg, "queries", 15)
    self.episodes = positive_int(cfg, "episodes", 600)
    self.seed = cfg.typed("seed", int, 0)
    self.classifier = check_choice(f"{cfg.path}.classifier",
                                   cfg.typed("classifier", str, "logistic"), CLASSIFIERS)
    self.C = float(cfg.typed("C", (float, int), 1.0))
    self.normalize = cfg.typed("normalize", bool, True)
    labels = streams.read_labels(self.source, self.label_key)
    chosen = cfg.get("classes")
    if chosen is not None:  # the novel classes of a split that holds more (CIFAR-FS, FC100)
      try:
        names = split.info.features[self.label_key].names if split.info is not None else None
      except (KeyError, AttributeError):
        names = None
      try:
        keep = class_subset(labels, class_ids(chosen, names, f"{cfg.path}.classes"))
      except ValueError as e:
        raise ConfigError(str(e)) from None
      self.source = streams.IndexedSubset(self.source, keep)
      labels = labels[keep]
    labels = labels[labels >= 0]  # unreadable records: -1
    need = max(self.shots) + self.queries
    have = sum(int((labels == c).sum()) >= need for c in np.unique(labels))
    if have < self.n_way:
      raise ConfigError(f"{cfg.path}: {self.n_way}-way episodes with {max(self.shots)} shots "
                        f"and {self.queries} queries need {self.n_way} classes with >= {need} "
                        f"examples in {split.dataset}:{split.split}; it has {have}")
    if "disjoint_from" in cfg.keys():  # None or '' turn the check off
      other = cfg.get("disjoint_from")
      if other is not None and not isinstance(other, str):
        raise ConfigError(f"{cfg.path}.disjoint_from must be a split name or None, got "
                          f"{other!r}")
    else:
      other = None if chosen is not None else "train"
    if other and other != split.split:
      check_disjoint(labels, split.dataset, other, task.data_dir, self.label_key, cfg.path,
                     _names(split.info, self.label_key))

  def features(self, params: Any, state: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({feature name: [N, D]}, labels [N])`` of the whole split (maps flattened)."""
    feats, labels = {}, None
    for name, fn in self._fns.items():
      out = predict_split(fn, params, state, self.source, self._transform, self.batch_size,
                          self.mesh)
      feats[name] = out["out"].reshape(len(out["out"]), -1)
      labels = out["label"]
    return feats, labels

  def run(self, params: Any, state: Any = None) -> dict[str, float]:
    feats, labels = self.features(params, state)
    out = {}
    for k in self.shots:
      acc = evaluate_episodes(feats, labels, n_way=self.n_way, k=k, queries=self.queries,
                              episodes=self.episodes, seed=self.seed,
                              classifier=self.classifier, C=self.C, normalize=self.normalize)
      mean, ci = mean_ci95(acc)
      out[f"acc_{self.n_way}way_{k}shot"] = mean
      out[f"ci95_{self.n_way}way_{k}shot"] = ci
    return out


def _names(info: Any, label_key: str) -> list[str] | None:
  try:
    return list(info.features[label_key].names)
  except (AttributeError, KeyError, TypeError):
    return None


def check_disjoint(labels: np.ndarray, dataset: str, other_split: str, data_dir: str,
                   label_key: str, where: str, names: Sequence[str] | None = None) -> None:
  """ConfigError if ``other_split`` of ``dataset`` has any class of ``labels``. With class
  names on both sides (``names``: the eval split's), classes are compared by name: image
  folders number their classes per split, so ids of different splits are unrelated."""
  source, info = sources.get_source(dataset, other_split, data_dir)
  seen_ids = set(np.unique(streams.read_labels(source, label_key)).tolist()) - {-1}
  mine_ids = set(np.unique(labels).tolist()) - {-1}
  other_names = _names(info, label_key)
  if names is not None and other_names is not None:
    seen = {other_names[i] for i in seen_ids if i < len(other_names)}
    mine = {names[i] for i in mine_ids if i < len(names)}
  else:
    seen, mine = seen_ids, mine_ids
  shared: Sequence[Any] = sorted(seen & mine)
  if shared:
    raise ConfigError(f"{where}: the eval split shares {len(shared)} classes (e.g. {shared[:5]}) "
                      f"with {dataset}:{other_split}: few-shot episodes must use classes never "
                      f"seen in training (set disjoint_from=None to skip this check)")
