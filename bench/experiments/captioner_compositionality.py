"""Does the generative captioner itself know composition? The compositionality benchmark
scored by the captioner's own likelihood: for each test image, the true caption wins a pair
when ``log p(true | image) > log p(negative | image)`` (summed over the caption's tokens and
EOS; swaps keep the length). A discriminative model fine-tuned from this captioner starts
from what this measures.

  python bench/experiments/captioner_compositionality.py --data_dir DIR \\
      --captioners W0 W1 W2 [--num_examples 512] [--out docs/results/captioner_compositionality.md]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def score(workdir: str, data_dir: str, num_examples: int) -> dict[str, float]:
  import jax
  import jax.numpy as jnp

  from bigvl import parallel, train
  from bigvl.config import load_sibling
  from bigvl.data import hard_negatives, sources

  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "lvlm_shapes").get_config(
      "tiny,stage=2,answer=both")
  c.input.data_dir, c.evals = data_dir, {}
  c.init_from.model.path = workdir
  run = train.build(c, devices=jax.devices()[:1])
  task = run.task
  batch = parallel.global_batch(next(task.train_data(0)), run.mesh)
  params = train.model_params(train.compile_run(run, batch).init(batch))
  source, _ = sources.get_source(task.dataset, "test", task.data_dir)
  rows, images = [], []  # (image index, type, token ids, loss mask)
  img_t = task.eval_transform("image_prompt")
  for i in range(min(num_examples, len(source))):
    ex = source[i]
    objs = hard_negatives.scene_objects(ex["objects"])
    truth = hard_negatives.true_caption(objs)
    images.append(img_t(ex)["image"])
    for kind, text in [("truth", truth)] + hard_negatives.hard_negatives(ex["objects"]):
      enc = task.chat.encode(text)
      rows.append((i, kind, enc["tokens"], enc["loss_mask"]))
  length = max(len(r[2]) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), np.float32)
  for j, (_, _, t, m) in enumerate(rows):
    tokens[j, :len(t)], mask[j, :len(m)] = t, m
  imgs = np.stack(images)[[r[0] for r in rows]]

  @jax.jit
  def logp(tok, msk, img):
    logits = task.model.apply({"params": params}, tok, img)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tgt = jnp.take_along_axis(lp, tok[:, 1:, None], axis=-1)[..., 0]
    return (tgt * msk[:, 1:]).sum(axis=1)

  out = np.concatenate([np.asarray(logp(tokens[s:s + 256], mask[s:s + 256], imgs[s:s + 256]))
                        for s in range(0, len(rows), 256)])
  truth = {r[0]: out[j] for j, r in enumerate(rows) if r[1] == "truth"}
  acc: dict[str, list[bool]] = {}
  for j, (i, kind, _, _) in enumerate(rows):
    if kind != "truth":
      acc.setdefault(kind, []).append(bool(truth[i] > out[j]))
  return {k: float(np.mean(v)) for k, v in acc.items()}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--captioners", nargs="+", required=True)
  ap.add_argument("--num_examples", type=int, default=512)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  sys.path.insert(0, REPO)
  results = [score(w, a.data_dir, a.num_examples) for w in a.captioners]
  kinds = sorted(results[0])
  lines = ["# The captioner's own likelihood on the compositionality benchmark", "",
           f"Command: `python bench/experiments/captioner_compositionality.py --data_dir DIR "
           f"--captioners {' '.join(a.captioners)} --num_examples {a.num_examples}`", "",
           "| negative type | accuracy (mean ± std over captioners) | per captioner |",
           "|---|---:|---|"]
  for k in kinds:
    v = 100 * np.array([r[k] for r in results])
    lines.append(f"| {k} | {v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f} | "
                 + ", ".join(f"{x:.1f}" for x in v) + " |")
  text = "\n".join(lines) + "\n"
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
