"""LFA for black-box users: few-shot adaptation of a V-L model from precomputed features.

  python -m bigvl.lfa --train TRAIN.npz --test TEST.npz [--shots 1 2 4 8 16] [--seeds 0 1 2]
      [--unsupervised [--ulfa-on shots|train|test]] [--linear-probe] [--out results.json]
      [--n-iters 200 ...]

Each of TRAIN / TEST is an ``.npz`` file or a directory of ``.npy`` files (read with
``allow_pickle=False``: nothing is unpickled) holding ``features`` [N, D] (image embeddings),
``labels`` [N] int in [0, C) and ``class_embeddings`` [C, D'] (text embeddings of the class
names; optional in TEST, which then uses TRAIN's), optionally ``class_names`` [C]. If
``D != D'`` (a uni-modal vision model and a separate text model) the larger side is reduced by
a Gaussian random projection, as the official code does. A missing key, a shape mismatch, an
out-of-range label or a non-finite value is one line on stderr and exit status 2.

For every shot count k and seed, k examples per class are drawn from TRAIN (seeded numpy rng)
and LFA (``bigvl.tasks.lfa.fit``) is fitted on them; accuracies are top-1 on all of TEST. The
zero-shot row is the identity map. ``--unsupervised`` adds U-LFA (``fit_unsupervised``, no
labels), fitted, as in the official code (``iterative_unsupervised_refinement`` on the train
split's features, which its README runs with ``DATA.N_SHOT 16``), on the sampled shots with
their labels dropped (``--ulfa-on shots``), or on all of TRAIN (``train``) or, transductively,
on the TEST features (``test``). Every ``LFAConfig`` field is a flag (``--n-iters``,
``--learning-rate``, ``--beta``, ...). Table on stdout, progress on stderr, all numbers in
``--out`` as json. ``--linear-probe`` adds the baseline of a logistic regression on the same
shots (:func:`linear_probe`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

from bigvl.tasks import lfa


class DataError(Exception):
  """A problem with an input file, reported as one line and exit status 2."""


def load_arrays(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` file or of a directory's ``.npy`` files, never unpickling."""
  try:
    if os.path.isdir(path):
      return {f[:-4]: np.load(os.path.join(path, f), allow_pickle=False)
              for f in sorted(os.listdir(path)) if f.endswith(".npy")}
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
      raise DataError(f"{path}: a single array; expected an .npz or a directory of .npy")
    with z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: cannot read: {str(e).splitlines()[0]}") from e


def check(arrays: dict[str, np.ndarray], path: str, class_emb: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(features, labels, class_embeddings)`` validated; ``class_emb`` is the fallback for a
  file without ``class_embeddings``."""
  need = ["features", "labels"] + ([] if class_emb is not None else ["class_embeddings"])
  missing = [k for k in need if k not in arrays]
  if missing:
    raise DataError(f"{path}: missing {', '.join(missing)} (has {', '.join(sorted(arrays))})")
  x, y = arrays["features"], arrays["labels"]
  t = arrays.get("class_embeddings", class_emb)
  for name, a in (("features", x), ("class_embeddings", t)):
    if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or 0 in a.shape:
      raise DataError(f"{path}: {name} must be a non-empty numeric [rows, dim] array, got "
                      f"{a.dtype}{list(a.shape)}")
    if not np.all(np.isfinite(a)):
      raise DataError(f"{path}: {name} has NaN or infinite values")
  if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or len(y) != len(x):
    raise DataError(f"{path}: labels must be int [{len(x)}] (one per feature row), got "
                    f"{y.dtype}{list(y.shape)}")
  if y.min() < 0 or y.max() >= len(t):
    raise DataError(f"{path}: labels must lie in [0, {len(t)}), got [{y.min()}, {y.max()}]")
  names = arrays.get("class_names")
  if names is not None and names.shape != (len(t),):
    raise DataError(f"{path}: class_names must be [{len(t)}], got {list(names.shape)}")
  return x.astype(np.float32), y.astype(np.int64), t.astype(np.float32)


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
  """Indices of ``shots`` random examples of every class present (all of a smaller class)."""
  rng = np.random.default_rng(seed)
  picks = [rng.choice(np.flatnonzero(labels == c), min(shots, int(np.sum(labels == c))),
                      replace=False) for c in np.unique(labels)]
  return np.sort(np.concatenate(picks))


#: the linear probe's inverse regularisation strengths (cross-validated).
PROBE_CS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def linear_probe(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                 seed: int = 0, cs: tuple[float, ...] = PROBE_CS, splits: int = 3,
                 frac: float = 0.8) -> float:
  """Test accuracy of the linear-probe baseline on the same shots: multinomial logistic
  regression (scikit-learn, lbfgs) on L2-normalised features, ``C`` chosen as LFA chooses its
  beta: the mean held-out accuracy over the same random splits of the shots
  (``bigvl.tasks.lfa.cv_splits``; ties: the stronger regularisation)."""
  import warnings

  from sklearn.linear_model import LogisticRegression

  # 1-shot: as many classes as samples, which scikit-learn warns about; it is the setting
  warnings.filterwarnings("ignore", message="The number of unique classes is greater")
  x, x_test = lfa.normalize(x), lfa.normalize(x_test)
  scores = np.zeros(len(cs))
  for tr, va in lfa.cv_splits(len(y), splits, frac, seed):
    if len(np.unique(y[tr])) < 2:
      continue
    for i, c in enumerate(cs):
      clf = LogisticRegression(C=c, max_iter=1000).fit(x[tr], y[tr])
      scores[i] += np.mean(clf.predict(x[va]) == y[va])
  best = cs[int(np.argmax(scores))]
  clf = LogisticRegression(C=best, max_iter=1000).fit(x, y)
  return float(np.mean(clf.predict(x_test) == y_test))


def _config_flags(ap: argparse.ArgumentParser) -> None:
  group = ap.add_argument_group("LFA knobs (bigvl.tasks.lfa.LFAConfig, official defaults)")
  for f in dataclasses.fields(lfa.LFAConfig):
    if f.name != "seed":
      group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                         type=float if f.default is None else type(f.default), metavar="V",
                         help=f"default {f.default}")


def _log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m bigvl.lfa", description=__doc__.split("\n\n")[0])
  ap.add_argument("--train", required=True, help=".npz or directory of .npy")
  ap.add_argument("--test", required=True, help=".npz or directory of .npy")
  ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--unsupervised", action="store_true", help="also run U-LFA")
  ap.add_argument("--ulfa-on", choices=["shots", "train", "test"], default="shots",
                  help="U-LFA's unlabelled data (default: the sampled shots, as official)")
  ap.add_argument("--linear-probe", action="store_true",
                  help="also the linear-probe baseline on the same shots (linear_probe)")
  ap.add_argument("--out", help="write the results here as json")
  _config_flags(ap)
  args = ap.parse_args(argv)
  config = lfa.LFAConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(
      lfa.LFAConfig) if f.name != "seed"})
  if min(args.shots) < 1:
    ap.error("--shots must be >= 1")
  try:
    x, y, t = check(load_arrays(args.train), args.train)
    xt, yt, tt = check(load_arrays(args.test), args.test, class_emb=t)
    if xt.shape[1] != x.shape[1] or tt.shape[1] != t.shape[1]:
      raise DataError(f"dims differ: TRAIN features/classes {x.shape[1]}/{t.shape[1]}, "
                      f"TEST {xt.shape[1]}/{tt.shape[1]}")
  except DataError as e:
    print(f"bigvl.lfa: {e}", file=sys.stderr, flush=True)
    return 2
  if x.shape[1] != t.shape[1]:   # uni-modal models: Gaussian projection to the smaller dim
    dim = min(x.shape[1], t.shape[1])
    _log(f"features {x.shape[1]}-d, class embeddings {t.shape[1]}-d: projecting to {dim}")
    x, xt, t, tt = (lfa.gaussian_projection(a, dim) for a in (x, xt, t, tt))

  zero_shot = lfa.accuracy(xt, yt, None, tt)
  runs = [{"method": "zero-shot", "shots": None, "seed": None, "beta": None,
           "accuracy": zero_shot}]
  _log(f"zero-shot: {100 * zero_shot:.2f}%  ({len(x)} train, {len(xt)} test, {len(t)} classes)")

  def run(method, shots, seed, fn):
    t0 = time.perf_counter()
    w, info = fn()
    acc = lfa.accuracy(xt, yt, w, tt)
    runs.append({"method": method, "shots": shots, "seed": seed, "beta": info["beta"],
                 "accuracy": acc, "seconds": time.perf_counter() - t0})
    _log(f"{method} shots={shots} seed={seed}: beta={info['beta']:.3f} acc={100 * acc:.2f}% "
         f"({runs[-1]['seconds']:.1f} s)")

  for seed in args.seeds:
    cfg = dataclasses.replace(config, seed=seed)
    for shots in args.shots:
      idx = sample_shots(y, shots, seed)
      run("LFA", shots, seed, lambda idx=idx, cfg=cfg: lfa.fit(x[idx], y[idx], t, cfg, True))
      if args.linear_probe:
        t0 = time.perf_counter()
        acc = linear_probe(x[idx], y[idx], xt, yt, seed)
        runs.append({"method": "linear probe", "shots": shots, "seed": seed, "beta": None,
                     "accuracy": acc, "seconds": time.perf_counter() - t0})
        _log(f"linear probe shots={shots} seed={seed}: acc={100 * acc:.2f}%")
      if args.unsupervised and args.ulfa_on == "shots":
        run("U-LFA", shots, seed, lambda idx=idx, cfg=cfg: lfa.fit_unsupervised(x[idx], t, cfg,
                                                                                  True))
    if args.unsupervised and args.ulfa_on != "shots":
      data = x if args.ulfa_on == "train" else xt
      run(f"U-LFA({args.ulfa_on})", None, seed,
          lambda cfg=cfg, data=data: lfa.fit_unsupervised(data, t, cfg, True))

  groups: dict[tuple, list[float]] = {}
  for r in runs:
    groups.setdefault((r["method"], r["shots"]), []).append(r["accuracy"])
  summary = [{"method": m, "shots": k, "mean": float(np.mean(a)), "std": float(np.std(a)),
              "n": len(a)} for (m, k), a in groups.items()]
  print(f"{'method':<14}{'shots':>6}{'runs':>6}{'top-1 %':>10}{'std':>7}")
  for s in summary:
    shots = "-" if s["shots"] is None else s["shots"]
    print(f"{s['method']:<14}{shots:>6}{s['n']:>6}{100 * s['mean']:>10.2f}{100 * s['std']:>7.2f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"train": args.train, "test": args.test, "config": dataclasses.asdict(config),
                 "runs": runs, "summary": summary}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
