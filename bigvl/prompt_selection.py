"""Rank candidate summary prompts for discriminative fine-tuning, before fine-tuning.

  python -m bigvl.prompt_selection --config configs/vladva_shapes.py:tiny,captioner=W \\
      [--num_images 256] [--prompts FILE.json] [--out prompts.md] [--config.key=value ...]

VladVA (Ouali et al., CVPR 2025) reads an image or a text followed by a "summarize in one
word" prompt and takes the last token's hidden state as the embedding; the paper found that
prompts under which the model's next-token distribution has *higher entropy* give better
retrieval. For every candidate pair (``summary_prompts.candidates`` in
``bigvl/data/chat_templates.json``, or ``--prompts FILE.json``), on the first ``num_images``
test images and their first captions, with the model the config starts from (its
``init_from``, hand-written prompts, no training):

* ``entropy``: mean over images of ``H(p(. | image, prompt)) = -sum_v p_v log p_v`` (nats)
  of the next-token distribution after the image prompt (and ``text_entropy`` after texts);
* ``spread``: ``1 - mean_{i != j} cos(x_i, x_j)`` of the image embeddings (collapsed
  embeddings, all alike, cannot retrieve);
* ``R@1``: image->text and text->image retrieval among the sample, as a check of the ranking.

Prompts are ranked by entropy (the paper's criterion); the table shows the rest beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def prompt_stats(task: Any, params: Any, images: np.ndarray, captions: list[str]
                 ) -> dict[str, float]:
  """The module docstring's statistics of ``task``'s prompts on ``images`` / ``captions``."""
  from bigvl.tasks.lvlm_disc import last_token, positions_of

  model = task.model
  tokens = jnp.asarray(task.encode_texts(captions)["tokens"])

  def stats(p):
    ids = jnp.broadcast_to(jnp.asarray(model.image_seq, jnp.int32),
                           (images.shape[0], len(model.image_seq)))
    logits = model.lvlm.apply({"params": p["lvlm"]}, ids, jnp.asarray(images))[:, -1]
    mask = tokens != model.pad_id
    tlogits = model.lvlm.apply({"params": p["lvlm"]}, tokens, attention_mask=mask,
                               positions=positions_of(mask))
    tlogits = last_token(tlogits, mask)
    zimg = model.apply({"params": p}, jnp.asarray(images), method="embed_images")
    ztxt = model.apply({"params": p}, tokens, method="embed_texts")
    return logits, tlogits, zimg, ztxt

  logits, tlogits, zimg, ztxt = jax.jit(stats)(params)

  def entropy(lg):
    logp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
    return float(jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1)))

  n = zimg.shape[0]
  cos = np.asarray(zimg @ zimg.T)
  spread = 1.0 - (cos.sum() - np.trace(cos)) / (n * (n - 1))
  sim = np.asarray(zimg @ ztxt.T)
  return {"entropy": entropy(logits), "text_entropy": entropy(tlogits),
          "spread": float(spread),
          "i2t_R@1": float(np.mean(np.argmax(sim, axis=1) == np.arange(n))),
          "t2i_R@1": float(np.mean(np.argmax(sim, axis=0) == np.arange(n)))}


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--num_images", type=int, default=256)
  ap.add_argument("--prompts", default=None, help="json list of {image, text} pairs")
  ap.add_argument("--out", default=None)
  argv = sys.argv if argv is None else argv
  a, rest = ap.parse_known_args(argv[1:])
  from bigvl import main as bigvl_main
  from bigvl import parallel, train
  from bigvl.config import ConfigError
  from bigvl.data import captioning, sources, transforms

  c = bigvl_main._parse([argv[0], *rest], need_workdir=False).config  # --config + overrides
  try:
    c.model.soft_prompts = False  # the hand-written prompts themselves are ranked
    c.evals = {}
    candidates = (json.load(open(a.prompts)) if a.prompts
                  else captioning.load_summary_prompts()["candidates"])
    run = train.build(c)
  except ConfigError as e:
    print(f"bigvl: bad config: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  task = run.task
  source, _ = sources.get_source(task.dataset, "test", task.data_dir)
  n = min(a.num_images, len(source))
  rows = [source[i] for i in range(n)]
  images = np.stack([task.image_row(r) for r in rows])
  captions = [transforms.texts_of(r["captions"])[0] for r in rows]
  data = task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  state = train.compile_run(run, batch).init(batch)  # reads config.init_from
  params = parallel.to_host(train.model_params(state))
  results = []
  for pair in candidates:
    c.prompts.image, c.prompts.text = pair["image"], pair["text"]
    results.append((pair, prompt_stats(train.build(c).task, params, images, captions)))
  results.sort(key=lambda r: -r[1]["entropy"])
  lines = [f"Prompt ranking (`python -m bigvl.prompt_selection {' '.join(argv[1:])}`; "
           f"{n} test images, no training)", "",
           "| rank | image prompt | text prompt | entropy | text entropy | spread | i2t R@1 | "
           "t2i R@1 |", "|---:|---|---|---:|---:|---:|---:|---:|"]
  for i, (pair, s) in enumerate(results, 1):
    lines.append(f"| {i} | {pair['image']} | {pair['text']} | {s['entropy']:.3f} | "
                 f"{s['text_entropy']:.3f} | {s['spread']:.3f} | {100 * s['i2t_R@1']:.1f}% | "
                 f"{100 * s['t2i_R@1']:.1f}% |")
  print("\n".join(lines))
  if a.out:
    with open(a.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
