"""Which features a few-shot run's episodes rest on: every finished run under ROOT (e.g. the
workdirs of ``scl_shapes.py``) re-evaluated on its evaluator's same 600 episodes with the
global features alone, the spatial features alone, and both (probabilities summed).

  python bench/experiments/scl_feature_kinds.py ROOT     # writes ROOT/feature_kinds.json
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections as mlc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from bigvl import checkpoint, parallel, train  # noqa: E402
from bigvl.evaluators import fewshot  # noqa: E402

KINDS = (("global",), ("spatial",), ("global", "spatial"))


def main() -> None:
  root = sys.argv[1]
  out = {}
  for name in sorted(os.listdir(root)):
    w = os.path.join(root, name)
    if not os.path.exists(os.path.join(w, "results.json")):
      continue
    with open(os.path.join(w, "config.json")) as f:
      run = train.build(mlc.ConfigDict(json.load(f)), devices=jax.devices()[:1])
    batch = parallel.global_batch(next(run.task.train_data(0)), run.mesh)
    fns = train.compile_run(run, batch)
    _, state, _ = checkpoint.Checkpointer(w).restore_latest(fns.abstract_state)
    ev = next(x for t in run.evaluators for x in t if isinstance(x, fewshot.Evaluator))
    feats, labels = ev.features(train.model_params(state), state["extra"])
    row = {}
    for kinds in KINDS:
      for k in ev.shots:
        acc = fewshot.evaluate_episodes({n: feats[n] for n in kinds}, labels, n_way=ev.n_way,
                                        k=k, queries=ev.queries, episodes=ev.episodes,
                                        seed=ev.seed)
        row[f"{'+'.join(kinds)}_{k}shot"] = round(100 * float(acc.mean()), 2)
    out[name] = row
    print(name, row, flush=True)
  with open(os.path.join(root, "feature_kinds.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
