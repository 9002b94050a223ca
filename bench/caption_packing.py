"""How much of a captioning batch is padding, with and without packing.

  python bench/caption_packing.py --data_dir /tmp/lv/data --out docs/results/caption_packing.md

For each template and answer (the first 4,096 train examples of ``shapes_captions``, encoded
exactly as ``lvlm_caption`` encodes them: ``N`` image placeholders + prompt + answer + EOS):
the fraction of token slots that are padding when every example gets its own row of the
longest example's length, and when ``bigvl.data.captioning`` packs them greedily into rows of
``seq_len`` slots holding at most ``max_images`` examples (``padding_stats``).
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--dataset", default="shapes_captions")
  ap.add_argument("--examples", type=int, default=4096)
  ap.add_argument("--image_tokens", type=int, default=16)
  ap.add_argument("--out", default=None)
  a = ap.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from bigvl.data import captioning, sources

  source, _ = sources.get_source(a.dataset, "train", a.data_dir)
  tok = captioning.shapes_tokenizer(os.path.join(a.data_dir, "bigvl_tokenizers",
                                                 "shapes_chat.json"))
  examples = [source[i] for i in range(min(a.examples, len(source)))]
  lines = [f"# Caption packing: padding fraction ({a.dataset}, {len(examples)} train examples,"
           f" {a.image_tokens} image tokens)", "",
           f"Command: `python bench/caption_packing.py --data_dir DIR --dataset {a.dataset} "
           f"--examples {a.examples} --image_tokens {a.image_tokens}`", "",
           "| template | answer | mean tokens | longest | padding, one example a row | "
           "seq_len x max_images | padding, packed | examples a row |",
           "|---|---|---:|---:|---:|---|---:|---:|"]
  for template in ("plain", "vicuna_v1"):
    chat = captioning.ChatEncoder(tok, template, a.image_tokens)
    for answer, question, seq_len in (("caption", "caption", 128),
                                      ("description", "description", 256)):
      lengths = [len(chat.encode(_text(ex[answer]), question)["tokens"]) for ex in examples]
      seq_len = max(seq_len, max(lengths))
      for k in (4, 8):
        st = captioning.padding_stats(lengths, seq_len, k)
        lines.append(f"| {template} | {answer} | {sum(lengths) / len(lengths):.1f} | "
                     f"{max(lengths)} | {st['pad_fraction_unpacked']:.3f} | {seq_len} x {k} | "
                     f"{st['pad_fraction_packed']:.3f} | {st['examples_per_row']:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


if __name__ == "__main__":
  main()
