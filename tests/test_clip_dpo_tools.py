"""CLIP-DPO's tools' pure parts: existence questions -> declaratives, the yes/no reflection,
candidate files that tolerate a corrupt line; and the cooc scenes that make an SFT pool
hallucinate (the truth every CLIP-DPO number is checked against)."""

from __future__ import annotations

import collections
import json

import pytest

from bigvl.config import ConfigError
from bigvl.data import sources
from bigvl.data.builders import shapes_captions as sc
from bigvl.evaluators.captioning import named_objects, scene_objects
from bigvl.tools import clip_dpo_candidates, clip_dpo_rank


def test_question_object_and_declarative():
  assert clip_dpo_rank.question_object("is there a red circle in the image ?") == "red circle"
  assert clip_dpo_rank.question_object("Is there an  white star in the image?") == "white star"
  with pytest.raises(ValueError, match="existence"):
    clip_dpo_rank.question_object("what colour is the circle ?")


@pytest.mark.parametrize("s, tau", [(30.0, 25.0), (20.0, 25.0), (25.0, 25.0)])
def test_yes_no_scores_reflect_about_the_threshold(s, tau):
  out = clip_dpo_rank.qa_scores(s, tau)
  assert out["yes"] - out["no"] == pytest.approx(2 * (s - tau))  # the pair's gap
  assert (out["yes"] > out["no"]) == (s > tau)
  assert (out["yes"] + out["no"]) / 2 == pytest.approx(tau)


def test_read_candidates_skips_corrupt_lines(tmp_path):
  d = tmp_path / "candidates"
  d.mkdir()
  rows = [{"image_index": i, "kind": "caption", "question": "caption", "text": f"t{i}",
           "source": "sample"} for i in range(3)]
  (d / "chunk_00000.jsonl").write_text(json.dumps(rows[0]) + "\n{not json\n")
  (d / "chunk_00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
  (d / "chunk_00002.jsonl.tmp123").write_text(json.dumps(rows[0]) + "\n")  # a killed writer
  got, bad = clip_dpo_candidates.read_candidates(str(tmp_path))
  assert [r["text"] for r in got] == ["t0", "t1", "t2"] and bad == 1
  with pytest.raises(ConfigError, match="chunk"):
    clip_dpo_candidates.read_candidates(str(tmp_path / "elsewhere"))


def test_partner_is_a_fixed_derangement():
  objects = [(c, s) for c in sc.COLORS for s in sc.SHAPES]
  mates = [sc.partner(c, s) for c, s in objects]
  assert sorted(mates) == sorted(objects)  # a permutation of the 24 objects
  assert all(m != o and m[0] != o[0] and m[1] != o[1] for m, o in zip(mates, objects, strict=True))


def test_cooc_scenes_and_their_hallucinating_sft_pool(shapes_data_dir):
  src, info = sources.get_source("shapes_captions/cooc_small", "train", shapes_data_dir)
  assert set(sc.SFT_FIELDS) <= set(info.features)
  n, with_partner, fake, answers = len(src), 0, 0, collections.Counter()
  for i in range(n):
    ex = src[i]
    scene = scene_objects(ex["objects"])
    first = (ex["objects"]["color"][0].decode(), ex["objects"]["shape"][0].decode())
    with_partner += sc.partner(*first) in scene
    # the clean description names exactly the scene; the SFT one adds at most one absent object
    assert named_objects(ex["description"]) == scene
    sft = named_objects(ex["sft_description"])
    extra = sft - scene
    assert scene <= sft and len(extra) <= 1
    h = ex["hallucinated"].decode()
    assert (h != "") == bool(extra)
    if h:
      fake += 1
      assert tuple(h.split()) in extra
    asked = tuple(clip_dpo_rank.question_object(ex["question"].decode()).split())
    truth = "yes" if asked in scene else "no"
    assert ex["answer"].decode() == truth
    answers[(truth, ex["sft_answer"].decode())] += 1
  assert 0.6 < with_partner / n < 0.85  # cooccur = 0.7 (plus chance pairings)
  assert 0.2 < fake / n < 0.4  # sft_noise = 0.3
  assert answers[("yes", "no")] == 0  # the pool's errors are hallucinations only
  assert answers[("no", "yes")] > 0 and answers[("no", "no")] > answers[("no", "yes")]
