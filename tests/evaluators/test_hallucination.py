"""The hallucination evaluator: POPE questions and metrics, AMBER's generative metrics and the
co-occurrence statistics on hand-made scenes, and the whole evaluator through the declared task
interface with fake tasks (an oracle, an always-yes answerer, a generator copying the truth
and one adding a co-occurring absent object)."""

from __future__ import annotations

import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import parallel
from bigvl.config import ConfigError, Reader
from bigvl.data import captioning as cap
from bigvl.data import sources, transforms
from bigvl.evaluators import hallucination as hal
from bigvl.evaluators.captioning import COLORS, SHAPES, scene_objects
from bigvl.tasks import base

R, B, G, W = ("red", "circle"), ("blue", "square"), ("green", "star"), ("white", "triangle")
P = ("purple", "circle")

# --- pure functions -----------------------------------------------------------------------


def test_object_stats_and_top_cooccurring():
  freq, cooc = hal.object_stats([{R, B}, {R, B, G}, {R, W}, {G}])
  assert freq == {R: 3, B: 2, G: 2, W: 1}
  assert cooc[R] == {B: 2, G: 1, W: 1} and cooc[G] == {R: 1, B: 1} and cooc[W] == {R: 1}
  assert hal.top_cooccurring(cooc, R, 1) == [B]
  assert hal.top_cooccurring(cooc, R, 2) == [B, G]  # G and W tie at 1: by name
  assert hal.top_cooccurring(cooc, P, 3) == []


def test_pope_questions_by_kind():
  # R is the most frequent object, but B co-occurs with G more than R does.
  stats = [{R, W}, {R, P}, {R}, {R}, {B, G}, {B, G}, {B, G}, {W}]
  freq, cooc = hal.object_stats(stats)
  vocab = sorted(freq)
  scenes = [{G}, {R, W, P}, {B}]
  popular = hal.pope_questions(scenes, vocab, freq, cooc, "popular", 1, seed=0)
  assert [(i, o) for i, o, t in popular if not t] == [(0, R), (1, B), (2, R)]
  adversarial = hal.pope_questions(scenes, vocab, freq, cooc, "adversarial", 1, seed=0)
  assert [(i, o) for i, o, t in adversarial if not t] == [(0, B), (1, B), (2, G)]
  # per_image 2: image 1's two next most popular absent objects; positives sampled.
  two = hal.pope_questions(scenes, vocab, freq, cooc, "popular", 2, seed=0)
  assert [o for i, o, t in two if i == 1 and not t] == [B, G]
  assert len([o for i, o, t in two if i == 1 and t]) == 2
  for kind in hal.POPE_KINDS:
    qs = hal.pope_questions(scenes, vocab, freq, cooc, kind, 3, seed=5)
    assert all((o in scenes[i]) == t for i, o, t in qs)  # negatives never present
    for i, scene in enumerate(scenes):
      pos = [o for j, o, t in qs if j == i and t]
      neg = [o for j, o, t in qs if j == i and not t]
      assert len(pos) == min(3, len(scene)) and len(neg) == min(len(pos), 5 - len(scene))
      assert len(set(neg)) == len(neg)
    assert qs == hal.pope_questions(scenes, vocab, freq, cooc, kind, 3, seed=5)
  # random negatives depend on the seed
  big = [(c, s) for c in ("red", "green", "blue", "white") for s in ("circle", "square")]
  draws = {tuple(hal.pope_questions([{big[0]}] * 4, big, freq, cooc, "random", 1, seed=s))
           for s in range(6)}
  assert len(draws) > 1


def test_pope_metrics_by_hand():
  labels = [True, True, True, False, False, False]
  preds = [True, True, False, True, False, False]  # TP 2, FN 1, FP 1, TN 2
  m = hal.pope_metrics(labels, preds)
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == pytest.approx(0.5)
  yes = hal.pope_metrics(labels, [True] * 6)
  assert (yes["precision"], yes["recall"], yes["yes_ratio"]) == (0.5, 1.0, 1.0)
  assert yes["f1"] == pytest.approx(2 / 3)
  no = hal.pope_metrics(labels, [False] * 6)
  assert (no["precision"], no["recall"], no["f1"], no["accuracy"]) == (0.0, 0.0, 0.0, 0.5)
  with pytest.raises(ValueError):
    hal.pope_metrics([True], [True, False])


def test_amber_metrics_by_hand():
  # top-1 co-occurring: R -> B, W -> P, G -> R; top-2 of W: [P, B].
  _, cooc = hal.object_stats([{R, B}, {R, B}, {R, G}, {W, P}, {W, P}, {W, B}])
  scenes = [{R}, {W, G}, {B}]
  texts = ["a red circle and a blue square .",      # B hallucinated: top-1 of R, a cog error
           "a white triangle next to a green star and a blue square",  # B: not top-1 of W, G
           "nothing here"]                             # mentions nothing, covers nothing
  m = hal.amber_metrics(texts, scenes, cooc, top_k=1)
  assert m["chair"] == pytest.approx(2 / 5)
  assert m["cover"] == pytest.approx((1 + 1 + 0) / 3)
  assert m["hal"] == pytest.approx(2 / 3)
  assert m["cog"] == pytest.approx(1 / 5)
  assert m["mean_words"] == pytest.approx((8 + 12 + 2) / 3)
  # B is in W's top 2: the second caption's blue square is now a co-occurrence error too.
  assert hal.amber_metrics(texts, scenes, cooc, top_k=2)["cog"] == pytest.approx(2 / 5)
  row = hal.amber_caption(texts[0], scenes[0], cooc, 1)
  assert row == {"mentioned": [B, R], "hallucinated": [B], "cog": [B]}
  assert hal.amber_metrics(["nothing"], [{R}], cooc)["chair"] == 0.0


# --- the evaluator through the task interface ---------------------------------------------

_POPE_RE = re.compile(r"is there a (\w+) (\w+) in the image \?")


class _Task(base.Task):
  """``image_answer`` rows carry the fake's verdict in ``tokens[0]`` (1: the answer it likes),
  decided on the host from the truth of the image (looked up by its bytes); ``answer_logprobs``
  turns it into a log-probability. ``generate`` returns the ids of ``caption(example)``."""

  dataset = "shapes_captions/small"

  def __init__(self, config, mesh, data_dir, tok, truth, *, answers="oracle", caption=None,
               kinds=("image_prompt", "image_answer")):
    super().__init__(config, mesh)
    self.data_dir, self.tok, self.truth, self.answers = data_dir, tok, truth, answers
    self.caption = caption or (lambda ex: ex["description"].decode())
    self.eval_kinds = kinds
    self.chat = cap.ChatEncoder(tok, "plain", num_image_tokens=2)
    self.asked: list[tuple[str, str]] = []

  def _likes(self, image, question, answer):
    scene, name = self.truth[np.asarray(image).tobytes()]
    if self.answers == "yes":
      return answer == "yes"
    m = _POPE_RE.fullmatch(question)
    if m:
      return answer == ("yes" if (m[1], m[2]) in scene else "no")
    assert question == "caption", question
    return answer == f"a {name}"

  def eval_transform(self, kind, **opts):
    if kind == "image_answer":
      assert not opts

      def answer_row(ex):
        assert ex["image"].dtype == np.uint8 and set(ex) == {"image", "question", "answer"}
        self.asked.append((ex["question"], ex["answer"]))
        tokens = np.zeros(4, np.int32)
        tokens[0] = self._likes(ex["image"], ex["question"], ex["answer"])
        return {"image": ex["image"].astype(np.float32) / 255, "tokens": tokens,
                "loss_mask": np.asarray([0, 1, 1, 1], np.int32)}
      return answer_row

    assert kind == "image_prompt" and opts == {"question": "description"}
    prompt_rows = transforms.build(cap.eval_prompt_specs(prompt_len=4, **opts), chat=self.chat)

    def prompt_row(ex):
      row = prompt_rows(ex)
      row["answer"] = self.tok.encode([self.caption(ex)], 96)[0]
      return row
    return prompt_row

  def predict_fns(self):
    def generate(params, state, batch):
      return batch["answer"] + 0 * params["w"]

    def answer_logprobs(params, state, batch):
      assert batch["image"].ndim == 4 and batch["tokens"].shape[1:] == (4,)
      return jnp.where(batch["tokens"][:, 0] == 1, -0.5, -3.0) + 0 * params["w"]
    return {"generate": generate, "answer_logprobs": answer_logprobs}

  def decode_texts(self, ids):
    return cap.decode_generated(self.tok, ids)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return cap.shapes_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def truth(shapes_data_dir):
  """image bytes -> (scene, label name) over the test split."""
  src, info = sources.get_source("shapes_captions/small", "test", shapes_data_dir)
  names = info.features["label"].names
  out = {}
  for i in range(len(src)):
    ex = src[i]
    out[ex["image"].tobytes()] = (scene_objects(ex["objects"]), names[ex["label"]])
  return out


N = 24
PARAMS = {"w": jnp.int32(1)}


def _evaluator(shapes_data_dir, tok, truth, cfg=None, **task_kw):
  mesh = parallel.make_mesh({"data": -1})
  task = _Task(Reader({}), mesh, shapes_data_dir, tok, truth, **task_kw)
  cfg = Reader({"num_examples": N, "batch_size": 64, "stats_examples": 300, **(cfg or {})},
               "config.evals.hal")
  return hal.Evaluator(cfg, base.EvalView(task), mesh), task, cfg


def test_oracle_and_faithful_captions(shapes_data_dir, tok, truth, tmp_path):
  every_key = {"split": "test", "seed": 3, "stats_split": "train", "predict_fn": "generate",
               "logprob_fn": "answer_logprobs",
               "pope": {"enabled": True, "question": hal.POPE_QUESTION, "per_image": 3,
                        "kinds": hal.POPE_KINDS},
               "caption": {"enabled": True, "question": "description", "cooc_top_k": 1},
               "zeroshot": {"enabled": True, "question": "caption", "answer": "a {name}",
                            "length_norm": True}}
  ev, task, cfg = _evaluator(shapes_data_dir, tok, truth, every_key)
  assert cfg.unread() == []
  out = ev.run(PARAMS, None, step=5, workdir=str(tmp_path))
  for kind in hal.POPE_KINDS:
    assert out[f"pope_{kind}/f1"] == out[f"pope_{kind}/accuracy"] == 1.0
    assert out[f"pope_{kind}/precision"] == out[f"pope_{kind}/recall"] == 1.0
    assert out[f"pope_{kind}/yes_ratio"] == 0.5
  assert out["pope/f1"] == 1.0 and out["zeroshot/accuracy"] == 1.0
  assert (out["chair"], out["cover"], out["hal"], out["cog"]) == (0.0, 1.0, 0.0, 0.0)
  assert out["mean_words"] > 5
  asked = {q for q, _ in task.asked}
  assert "is there a red circle in the image ?" in asked and "caption" in asked
  assert {a for q, a in task.asked if q == "caption"} == {f"a {c} {s}" for c in COLORS
                                                          for s in SHAPES}
  rows = [json.loads(line) for line in open(tmp_path / "hallucination" / "step_5.jsonl")]
  assert [r["index"] for r in rows] == list(range(N))
  assert all(sorted(r["mentioned"]) == r["objects"] and r["hallucinated"] == r["cog"] == []
             for r in rows)


def test_always_yes_and_cooccurrence_hallucinations(shapes_data_dir, tok, truth):
  src, _ = sources.get_source("shapes_captions/small", "train", shapes_data_dir)
  _, cooc = hal.object_stats(scene_objects(src[i]["objects"]) for i in range(300))
  vocab = [(c, s) for c in COLORS for s in SHAPES]

  def likely(scene):
    return sorted({o for t in scene for o in hal.top_cooccurring(cooc, t, 1)} - scene)

  def add_likely(ex):  # names every true object, then an absent one seen with them
    scene = scene_objects(ex["objects"])
    extra = (likely(scene) or [o for o in vocab if o not in scene])[0]
    return f"{ex['description'].decode()} there is a {extra[0]} {extra[1]} ."

  test, _ = sources.get_source("shapes_captions/small", "test", shapes_data_dir)
  scenes = [scene_objects(test[i]["objects"]) for i in range(N)]
  num_cog = sum(bool(likely(s)) for s in scenes)
  num_mentioned = sum(len(s) + 1 for s in scenes)
  ev, _, _ = _evaluator(shapes_data_dir, tok, truth, {"zeroshot": {"enabled": False}},
                        answers="yes", caption=add_likely)
  out = ev.run(PARAMS)
  assert "zeroshot/accuracy" not in out
  for kind in hal.POPE_KINDS:
    assert out[f"pope_{kind}/yes_ratio"] == 1.0 and out[f"pope_{kind}/precision"] == 0.5
    assert out[f"pope_{kind}/recall"] == 1.0 and out[f"pope_{kind}/accuracy"] == 0.5
  assert out["pope/f1"] == pytest.approx(2 / 3)
  assert out["hal"] == 1.0 and out["cover"] == 1.0
  assert out["chair"] == pytest.approx(N / num_mentioned)
  assert num_cog > 0 and out["cog"] == pytest.approx(num_cog / num_mentioned)
  assert all(len(r["hallucinated"]) == 1 for r in ev.last_captions)


def test_config_errors(shapes_data_dir, tok, truth):
  with pytest.raises(ConfigError, match="no scene graph"):
    _evaluator(shapes_data_dir, tok, truth, {"dataset": "shapes_captions/small:1.1.0"})
  with pytest.raises(ConfigError, match="needs eval data 'image_answer'"):
    _evaluator(shapes_data_dir, tok, truth, kinds=("image_prompt",))
  with pytest.raises(ConfigError, match="'typical' is not one of"):
    _evaluator(shapes_data_dir, tok, truth, {"pope": {"kinds": ("random", "typical")}})
  with pytest.raises(ConfigError, match=re.escape("must hold {object}")):
    _evaluator(shapes_data_dir, tok, truth, {"pope": {"question": "is there a thing ?"}})
  with pytest.raises(ConfigError, match="prediction functions generate"):
    _evaluator(shapes_data_dir, tok, truth, {"logprob_fn": "scores"})
  # captions alone need no answer scoring; the disabled groups' keys are still read
  ev, _, cfg = _evaluator(shapes_data_dir, tok, truth,
                          {"pope": {"enabled": False, "per_image": 2},
                           "zeroshot": {"enabled": False}}, kinds=("image_prompt",))
  assert cfg.unread() == [] and set(ev.run(PARAMS)) == {"chair", "cover", "hal", "cog",
                                                          "mean_words"}
