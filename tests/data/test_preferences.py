"""CLIP-DPO pairing and filtering on crafted, already-scored candidates: every rule removes exactly
the crafted bad group and is counted under its own name, boundaries are as documented, and the
random ablation ignores scores but is deterministic per seed."""

from __future__ import annotations

import json
import os

import pytest

from bigvl.config import ConfigError
from bigvl.data import preferences as prefs
from bigvl.data.preferences import Candidate, Rules

GOOD = [Candidate("a red ball on grass", 30.0), Candidate("a blue ball on sand", 20.0)]


def _c(text: str, score: float, source: str = "sample") -> Candidate:
  return Candidate(text, score, source)


def _texts(pairs: list[prefs.Pair]) -> list[tuple[str, str]]:
  return [(p.chosen.text, p.rejected.text) for p in pairs]


def _rule_counts(summary: dict[str, int]) -> dict[str, int]:
  return {k: v for k, v in summary.items() if k in prefs.RULES and v}


# One crafted bad group per rule (next to GOOD, which every rule keeps):
# (rules, bad group, text_scores or None).
BAD_GROUPS = {
    "too_few": (Rules(), [_c("a red ball on grass", 30.0)], None),
    "both_bad": (Rules(both_bad=25.0),
                 [_c("a red ball on grass", 24.9), _c("a blue ball on sand", 10.0)], None),
    "min_chosen": (Rules(min_chosen=25.0),
                   [_c("a red ball on grass", 24.9), _c("a blue ball on sand", 10.0)], None),
    "max_rejected": (Rules(max_rejected=21.0),
                     [_c("a red ball on grass", 30.0), _c("a blue ball on sand", 21.5)], None),
    "min_gap": (Rules(), [_c("a red ball on grass", 30.0), _c("a blue ball on sand", 28.5)],
                None),
    "length_ratio": (Rules(), [_c("a red ball on grass", 30.0), _c("ball", 10.0)], None),
    "text_in_image": (Rules(max_text_score=0.5), list(GOOD), {"good": 0.5, "bad": 0.9}),
}


@pytest.mark.parametrize("rule", sorted(BAD_GROUPS))
def test_each_rule_removes_exactly_its_crafted_group(rule):
  rules, bad, text_scores = BAD_GROUPS[rule]
  groups = {("good", "q"): GOOD, ("bad", "q"): bad}
  pairs, summary = prefs.make_pairs(groups, rules, text_scores=text_scores)
  assert [p.key for p in pairs] == [("good", "q")]
  assert _texts(pairs) == [("a red ball on grass", "a blue ball on sand")]
  assert _rule_counts(summary) == {rule: 1}
  assert summary["groups"] == 2 and summary["pairs"] == 1
  assert set(summary) == set(prefs.SUMMARY_KEYS)


def test_threshold_boundaries_are_inclusive_as_documented():
  # best == both_bad / == min_chosen, rejected == max_rejected, text score == max: all kept.
  group = [_c("a red ball on grass", 25.0), _c("a blue ball on sand", 21.0)]
  rules = Rules(both_bad=25.0, min_chosen=25.0, max_rejected=21.0, max_text_score=0.5)
  pairs, summary = prefs.make_pairs({("img", "q"): group}, rules, text_scores={"img": 0.5})
  assert len(pairs) == 1 and not _rule_counts(summary)


def test_both_bad_is_counted_before_min_chosen():
  group = [_c("a red ball on grass", 20.0), _c("a blue ball on sand", 10.0)]
  _, summary = prefs.make_pairs({(0, "q"): group}, Rules(both_bad=25.0, min_chosen=25.0))
  assert _rule_counts(summary) == {"both_bad": 1}


def test_gap_boundary_exactly_min_gap_kept_just_below_dropped():
  kept = [_c("one two three", 30.0), _c("four five six", 28.0)]
  dropped = [_c("one two three", 30.0), _c("four five six", 28.01)]
  pairs, summary = prefs.make_pairs({(0, "k"): kept, (1, "d"): dropped}, Rules(min_gap=2.0))
  assert [p.key for p in pairs] == [(0, "k")]
  assert _rule_counts(summary) == {"min_gap": 1}
  # min_gap=0 keeps a tie (the earlier candidate is chosen).
  tie = [_c("one two three", 30.0), _c("four five six", 30.0)]
  pairs, _ = prefs.make_pairs({(0, "t"): tie}, Rules(min_gap=0.0))
  assert _texts(pairs) == [("one two three", "four five six")]


def test_length_ratio_picks_the_next_worst_candidate_that_satisfies_it():
  group = [
      _c("w w w w w w", 25.0),         # 6 words
      _c("a b c d e f", 40.0),         # chosen, 6 words
      _c("x", 10.0),                   # worst, ratio 6 > 2
      _c("p q r s", 20.0),             # next-worst, ratio 1.5
      _c("y y", 15.0),                 # ratio 3 > 2
  ]
  pairs, summary = prefs.make_pairs({(0, "q"): group}, Rules())
  assert _texts(pairs) == [("a b c d e f", "p q r s")]
  assert not _rule_counts(summary)
  # Without the rule the worst candidate is rejected.
  pairs, _ = prefs.make_pairs({(0, "q"): group}, Rules(max_length_ratio=None))
  assert _texts(pairs) == [("a b c d e f", "x")]
  # The ratio bound itself is inclusive: 2 words vs 4 words with max 2.
  pairs, _ = prefs.make_pairs({(0, "q"): [_c("a b c d", 30.0), _c("e f", 10.0)]}, Rules())
  assert len(pairs) == 1


def test_ties_are_broken_by_original_order():
  group = [_c("a b", 10.0), _c("c d", 30.0), _c("e f", 30.0), _c("g h", 10.0)]
  pairs, _ = prefs.make_pairs({0: group}, Rules())
  # chosen: the first of the 30s; rejected: the last-ranked of the 10s (the later one).
  assert _texts(pairs) == [("c d", "g h")]


def test_dedupe_keeps_the_first_and_gt_over_sample():
  group = [
      _c("A cat  sits.", 20.0),
      _c("a dog runs", 10.0),
      _c("a cat sits", 30.0, "gt"),       # duplicate of the first: the gt one is kept
      _c("A DOG RUNS.", 40.0),            # duplicate of a sample: the first is kept
  ]
  pairs, summary = prefs.make_pairs({0: group}, Rules())
  assert summary["duplicates"] == 2
  assert len(pairs) == 1
  assert pairs[0].chosen == _c("a cat sits", 30.0, "gt")
  assert pairs[0].rejected == _c("a dog runs", 10.0)
  # gt first, sample later: the gt stays.
  group = [_c("a cat", 30.0, "gt"), _c("A cat.", 35.0), _c("a dog", 10.0)]
  pairs, summary = prefs.make_pairs({0: group}, Rules())
  assert summary["duplicates"] == 1 and pairs[0].chosen.source == "gt"
  # Duplicates only leaving one candidate -> too_few.
  _, summary = prefs.make_pairs({0: [_c("a cat", 30.0), _c("a  CAT.", 20.0)]}, Rules())
  assert _rule_counts(summary) == {"duplicates": 1, "too_few": 1}


def test_include_gt():
  group = [_c("the gt answer", 40.0, "gt"), _c("a good one", 30.0), _c("a bad one", 20.0)]
  pairs, summary = prefs.make_pairs({0: group}, Rules())
  assert _texts(pairs) == [("the gt answer", "a bad one")] and summary["gt_excluded"] == 0
  pairs, summary = prefs.make_pairs({0: group}, Rules(include_gt=False))
  assert _texts(pairs) == [("a good one", "a bad one")]
  assert _rule_counts(summary) == {"gt_excluded": 1}
  # gt may also be rejected when included.
  low = [_c("the gt answer", 5.0, "gt"), _c("a good one", 30.0)]
  pairs, _ = prefs.make_pairs({0: low}, Rules())
  assert pairs[0].rejected.source == "gt"
  # Excluded before dedupe: a sample equal to the gt answer survives.
  same = [_c("a cat", 40.0, "gt"), _c("A cat.", 35.0), _c("a dog", 20.0)]
  pairs, summary = prefs.make_pairs({0: same}, Rules(include_gt=False))
  assert _texts(pairs) == [("A cat.", "a dog")]
  assert _rule_counts(summary) == {"gt_excluded": 1}
  # Only a gt and one sample -> too_few without the gt.
  _, summary = prefs.make_pairs({0: low}, Rules(include_gt=False))
  assert _rule_counts(summary) == {"gt_excluded": 1, "too_few": 1}


def test_text_in_image_uses_image_of_and_requires_scores():
  groups = {"img1/q": GOOD, "img2/q": GOOD, "img3/q": GOOD}
  rules = Rules(max_text_score=0.3)
  scores = {"img1": 0.1, "img2": 0.31, "img3": 0.3}
  pairs, summary = prefs.make_pairs(groups, rules, text_scores=scores,
                                    image_of=lambda k: k.split("/")[0])
  assert [p.key for p in pairs] == ["img1/q", "img3/q"]
  assert _rule_counts(summary) == {"text_in_image": 1}
  # text_scores are ignored without the rule.
  pairs, _ = prefs.make_pairs({("img2", "q"): GOOD}, Rules(), text_scores={"img2": 1.0})
  assert len(pairs) == 1
  with pytest.raises(ConfigError, match="text_scores"):
    prefs.make_pairs({("img1", "q"): GOOD}, rules)
  with pytest.raises(ValueError, match="img9"):
    prefs.make_pairs({("img9", "q"): GOOD}, rules, text_scores=scores)


def test_random_pairing_ignores_scores():
  close = [_c("a red ball on grass", 30.0), _c("a blue ball on sand", 29.5)]
  _, summary = prefs.make_pairs({0: close}, Rules())
  assert _rule_counts(summary) == {"min_gap": 1}
  strict = Rules(pairing="random", both_bad=100.0, min_chosen=100.0, max_rejected=-100.0)
  pairs, summary = prefs.make_pairs({0: close}, strict)
  assert len(pairs) == 1 and not _rule_counts(summary)
  assert {pairs[0].chosen.text, pairs[0].rejected.text} == {c.text for c in close}


def _many_groups(n: int = 200) -> dict:
  return {(i, "q"): [_c(f"answer one {i}", 50.0 + i), _c(f"answer two {i}", 10.0 + i / 7)]
          for i in range(n)}


def test_random_pairing_is_deterministic_per_seed_and_unranked():
  groups = _many_groups()
  rules = Rules(pairing="random")
  pairs0, summary = prefs.make_pairs(groups, rules, seed=0)
  assert summary["pairs"] == 200 and not _rule_counts(summary)
  assert pairs0 == prefs.make_pairs(groups, rules, seed=0)[0]
  pairs1, _ = prefs.make_pairs(groups, rules, seed=1)
  assert _texts(pairs0) != _texts(pairs1)
  for pairs in (pairs0, pairs1):
    higher = sum(p.chosen.score > p.rejected.score for p in pairs)
    assert 70 <= higher <= 130, higher  # ~Binomial(200, 1/2): mean 100, sd ~7
    assert all(p.chosen != p.rejected for p in pairs)


def test_random_pairing_keeps_hygiene_rules():
  long_ = "one two three four five six"
  groups = {
      ("a", 0): [_c(long_, 30.0), _c("x", 20.0)],                       # length_ratio
      ("b", 0): [_c("a cat", 30.0), _c("A cat.", 20.0)],                # duplicates + too_few
      ("c", 0): [_c("a cat", 30.0, "gt"), _c("a dog", 20.0)],           # gt_excluded + too_few
      ("d", 0): list(GOOD),                                             # text_in_image
  }
  outlier = long_ + " seven"  # 7 words vs 3: ratio > 2 with every other candidate
  for i in range(20):  # never pairs the outlier
    groups[("e", i)] = [_c("a b c", 1.0), _c("d e f", 2.0), _c("g h i", 3.0), _c(outlier, 4.0)]
  rules = Rules(pairing="random", include_gt=False, max_text_score=0.5)
  scores = {"a": 0.0, "b": 0.0, "c": 0.0, "d": 0.9, "e": 0.0}
  pairs, summary = prefs.make_pairs(groups, rules, text_scores=scores)
  assert _rule_counts(summary) == {"length_ratio": 1, "duplicates": 1, "too_few": 2,
                                   "gt_excluded": 1, "text_in_image": 1}
  assert len(pairs) == 20 and all(p.key[0] == "e" for p in pairs)
  assert all(outlier not in (p.chosen.text, p.rejected.text) for p in pairs)


def test_pairs_per_group_two():
  group = [_c("a a", 40.0), _c("b b", 35.0), _c("c c", 20.0), _c("d d", 10.0)]
  pairs, summary = prefs.make_pairs({0: group}, Rules(pairs_per_group=2))
  assert _texts(pairs) == [("a a", "d d"), ("b b", "d d")]
  assert summary["pairs"] == 2 and not _rule_counts(summary)
  # A failing extra pair is counted; the first pair is kept.
  group = [_c("a a", 40.0), _c("b b", 30.0), _c("c c", 29.0), _c("d d", 29.5)]
  pairs, summary = prefs.make_pairs({0: group}, Rules(pairs_per_group=2))
  assert _texts(pairs) == [("a a", "c c")]
  assert _rule_counts(summary) == {"min_gap": 1} and summary["pairs"] == 1
  # min_chosen applies to each chosen.
  group = [_c("a a", 40.0), _c("b b", 30.0), _c("c c", 10.0)]
  pairs, summary = prefs.make_pairs({0: group}, Rules(pairs_per_group=2, min_chosen=35.0))
  assert _texts(pairs) == [("a a", "c c")] and _rule_counts(summary) == {"min_chosen": 1}
  # A failing first pair drops the group: no further attempts.
  group = [_c("a a", 40.0), _c("b b", 39.0), _c("c c", 39.5)]
  pairs, summary = prefs.make_pairs({0: group}, Rules(pairs_per_group=2))
  assert pairs == [] and _rule_counts(summary) == {"min_gap": 1}
  # At most n - 1 attempts.
  pairs, summary = prefs.make_pairs({0: list(GOOD)}, Rules(pairs_per_group=3))
  assert len(pairs) == 1 and not _rule_counts(summary)
  # Random: distinct unordered pairs.
  group = [_c(f"answer {i}", float(i)) for i in range(5)]
  for seed in range(10):
    pairs, summary = prefs.make_pairs({0: group}, Rules(pairing="random", pairs_per_group=4),
                                      seed=seed)
    assert summary["pairs"] == 4
    assert len({frozenset((p.chosen.text, p.rejected.text)) for p in pairs}) == 4


def test_summary_counts_add_up():
  long_ = "one two three four five six"
  groups = {
      0: list(GOOD),
      1: [_c("only one", 30.0)],
      2: [_c("a b", 10.0), _c("c d", 9.0)],                          # both_bad
      3: [_c("a b", 24.0), _c("c d", 23.0)],                         # min_gap
      4: [_c("a b", 30.0), _c(long_, 10.0)],                         # length_ratio
      5: [_c("a b", 30.0), _c("c d", 26.0)],                         # max_rejected
      6: [_c("a b", 30.0), _c("a  B.", 10.0), _c("c d", 12.0)],      # kept, 1 duplicate
      7: [],                                                         # too_few
      8: list(GOOD),                                                 # text_in_image
  }
  rules = Rules(both_bad=15.0, max_rejected=25.0, max_text_score=0.5)
  text_scores = {i: 0.9 if i == 8 else 0.0 for i in groups}
  pairs, summary = prefs.make_pairs(groups, rules, text_scores=text_scores, image_of=lambda k: k)
  assert list(summary) == list(prefs.SUMMARY_KEYS)
  assert summary == {"groups": 9, "duplicates": 1, "gt_excluded": 0, "text_in_image": 1,
                     "too_few": 2, "both_bad": 1, "min_chosen": 0, "max_rejected": 1,
                     "min_gap": 1, "length_ratio": 1, "pairs": 2}
  group_rules = [k for k in prefs.RULES if k not in ("duplicates", "gt_excluded")]
  assert summary["groups"] == sum(summary[k] for k in group_rules) + len({p.key for p in pairs})
  assert len(pairs) == summary["pairs"]


def test_candidate_and_pair_values():
  a = Candidate("a cat", 30.0, meta={"temperature": 0.7})
  b = Candidate("a cat", 30.0, meta={"temperature": 1.0})
  assert a == b and hash(a) == hash(b)  # meta takes no part in equality / hashing
  with pytest.raises(ValueError, match="source"):
    Candidate("a cat", 30.0, source="human")
  with pytest.raises(ValueError, match="finite"):
    Candidate("a cat", float("nan"))


@pytest.mark.parametrize("kwargs,field", [
    ({"min_gap": -0.1}, "min_gap"),
    ({"max_length_ratio": 0.5}, "max_length_ratio"),
    ({"pairing": "ranked"}, "pairing"),
    ({"pairs_per_group": 0}, "pairs_per_group"),
    ({"pairs_per_group": 1.5}, "pairs_per_group"),
    ({"pairs_per_group": True}, "pairs_per_group"),
    ({"min_chosen": float("nan")}, "min_chosen"),
    ({"max_rejected": "20"}, "max_rejected"),
    ({"include_gt": "yes"}, "include_gt"),
])
def test_bad_rules_raise_config_error(kwargs, field):
  with pytest.raises(ConfigError, match=f"Rules.{field}") as info:
    Rules(**kwargs)
  assert "\n" not in str(info.value)


def test_jsonl_round_trip(tmp_path):
  pairs, _ = prefs.make_pairs({(3, "What is it?"): [_c("un chat — é", 30.0, "gt"),
                                                    _c("a dog", 20.0)],
                               (4, "q"): list(GOOD)}, Rules())
  path = os.path.join(tmp_path, "sub", "pairs.jsonl")
  n = prefs.write_pairs_jsonl(path, pairs, extra=lambda p: {"image": p.key[0],
                                                            "prompt": p.key[1]})
  assert n == 2 and os.listdir(os.path.dirname(path)) == ["pairs.jsonl"]
  records = prefs.read_pairs_jsonl(path)
  assert records[0] == {"chosen": "un chat — é", "rejected": "a dog", "chosen_score": 30.0,
                        "rejected_score": 20.0, "chosen_source": "gt",
                        "rejected_source": "sample", "image": 3, "prompt": "What is it?"}
  assert [(r["chosen"], r["rejected"]) for r in records] == _texts(pairs)
  with pytest.raises(ValueError, match="chosen"):
    prefs.write_pairs_jsonl(path, pairs, extra=lambda p: {"chosen": "x"})
  assert prefs.read_pairs_jsonl(path) == records  # the failed write left the file alone
  assert os.listdir(os.path.dirname(path)) == ["pairs.jsonl"]
  with open(path, "a") as f:
    f.write(json.dumps({"chosen": "only"}) + "\n")
  with pytest.raises(ValueError, match=":3:"):
    prefs.read_pairs_jsonl(path)


def test_split_sentences():
  assert prefs.split_sentences("A cat sits. It is red!  Why? ") == ["A cat sits", "It is red",
                                                                     "Why"]
  assert prefs.split_sentences("no punctuation here") == ["no punctuation here"]
  assert prefs.split_sentences("Wait... what?!") == ["Wait", "what"]
  assert prefs.split_sentences("  . ! ") == []


def test_aggregate_sentences():
  assert prefs.aggregate_sentences([30.0, 20.0, 10.0]) == pytest.approx(20.0)
  assert prefs.aggregate_sentences([30.0, 20.0, 10.0], how="min") == 10.0
  with pytest.raises(ValueError, match="at least one"):
    prefs.aggregate_sentences([])
  with pytest.raises(ValueError, match="how"):
    prefs.aggregate_sentences([1.0], how="max")


def test_summary_table():
  _, summary = prefs.make_pairs({0: list(GOOD), 1: []}, Rules())
  table = prefs.summary_table(summary)
  lines = table.splitlines()
  assert lines[0] == "| rule | removed |"
  assert [line.split("|")[1].strip() for line in lines[2:]] == [*prefs.RULES, "pairs kept"]
  assert "| too_few | 1 |" in lines and lines[-1] == "| pairs kept | 1 |"
