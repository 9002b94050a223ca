"""Reading a TFDS dataset: TFDS's numpy decoder vs bigvl's (bigvl/data/tfds_decode.py), and
the train pipeline a config pulls.

  python -m bench.data_read [--dataset shapes_captions] [--records 2000] \\
      [--config configs/siglip_shapes.py:tiny --batches 30]

Part 1, per record (median of 3 passes over the same ``--records`` records in a shuffled
order): TFDS's ``as_data_source`` decoding, the raw record read alone, and bigvl's decoding of
the raw records (checked equal to TFDS's on every measured record). Part 2: the config's
train stream (``task.train_data`` -- read, decode, transform, batch: what the train loop
pulls) in ms per batch of wall and of process CPU time, with 1 and 2 reader threads. The
dataset is prepared under ``$BIGVL_DATA`` if it is not there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _per_record_us(read, indices) -> float:
  passes = []
  for _ in range(3):
    t0 = time.perf_counter()
    for i in indices:
      read(int(i))
    passes.append((time.perf_counter() - t0) / len(indices) * 1e6)
  return statistics.median(passes)


def records(dataset: str, split: str, n: int) -> list[tuple[str, float]]:
  import tensorflow_datasets as tfds

  from bigvl.data import sources, tfds_decode

  builder = sources.tfds_builder(dataset, sources.data_dir())
  ref = builder.as_data_source(split=split)
  raw = builder.as_data_source(split=split,
                               deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  decode = tfds_decode.fast_decoder(builder.info.features)
  if decode is None:
    raise SystemExit(f"{dataset}: its features are not plain; bigvl reads it with TFDS")
  fast = tfds_decode.DecodedSource(raw, decode)
  idx = np.random.default_rng(0).permutation(len(ref))[:n]
  for i in idx[:200]:  # the same examples (tests/data/test_tfds_decode.py checks all)
    a, b = fast[int(i)], ref[int(i)]
    assert list(a) == list(b) and np.array_equal(a["image"], b["image"]), i
  return [("TFDS decoder (as_data_source)", _per_record_us(ref.__getitem__, idx)),
          ("raw record read only", _per_record_us(raw.__getitem__, idx)),
          ("bigvl decoder (read + decode)", _per_record_us(fast.__getitem__, idx))]


def pipeline(config: str, batches: int) -> list[tuple[int, float, float, int]]:
  from bigvl import train
  from bigvl.config import load_config

  out = []
  for threads in (1, 2):
    c = load_config(config)
    c.evals = {}
    c.input.num_threads = threads
    task = train.build(c).task
    data = task.train_data(0)
    first = next(data)  # threads started, buffers filling
    size = len(next(iter(first.values())))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
      next(data)
    out.append((threads, (time.perf_counter() - t0) / batches * 1e3,
                (time.process_time() - c0) / batches * 1e3, size))
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dataset", default="shapes_captions")
  ap.add_argument("--split", default="train")
  ap.add_argument("--records", type=int, default=2000)
  ap.add_argument("--config", default="configs/siglip_shapes.py:tiny")
  ap.add_argument("--batches", type=int, default=30)
  a = ap.parse_args()
  print(f"{a.dataset}:{a.split}, {a.records} records in a shuffled order\n")
  print("| read | us/record |\n|---|---:|")
  for name, us in records(a.dataset, a.split, a.records):
    print(f"| {name} | {us:.0f} |")
  print(f"\n{a.config} train stream\n\n| reader threads | ms/batch (wall) | ms/batch (CPU) "
        f"| batch |\n|---:|---:|---:|---:|")
  for threads, wall, cpu, size in pipeline(a.config, a.batches):
    print(f"| {threads} | {wall:.1f} | {cpu:.1f} | {size} |")


if __name__ == "__main__":
  main()
