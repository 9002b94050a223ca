"""End to end: the tiny captioner (``bigvl.main``, CPU) names its scenes' objects well above
chance and writes its captions to the workdir."""

from __future__ import annotations

import json
import os

import pytest


@pytest.mark.slow
def test_tiny_captioner_names_objects_above_chance(tiny_captioner):
  workdir, results = tiny_captioner
  recall, chance = results["captions/object_recall"], results["captions/chance_object_recall"]
  # chance: each image scored with the caption generated for another image
  assert recall > 0.2 and recall > 2 * chance, results
  assert results["captions/object_precision"] > 2 * results["captions/chance_object_precision"]
  lines = open(os.path.join(workdir, "captions", "step_400.jsonl")).read().splitlines()
  rows = [json.loads(x) for x in lines]
  assert len(rows) == 128 and all(r["generated"] for r in rows)
