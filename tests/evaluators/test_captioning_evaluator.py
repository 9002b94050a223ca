"""The captioning evaluator: object parsing and scores against hand-made examples, and the
whole evaluator through the declared task interface with fake generators (the reference
caption -> all 1; a fixed wrong caption -> lower; chance below a faithful captioner)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import parallel
from bigvl.config import ConfigError, Reader
from bigvl.data import captioning as cap
from bigvl.data import transforms
from bigvl.evaluators import captioning as ev_cap
from bigvl.tasks import base

# --- pure scoring functions ---------------------------------------------------------------


def test_normalize_and_named_objects():
  assert ev_cap.normalize("Two shapes: a Red circle.") == "two shapes : a red circle ."
  assert ev_cap.normalize(b"a  red\ncircle") == "a red circle"
  assert ev_cap.named_objects("a large red circle left of a blue square and two green stars"
                              ) == {("red", "circle"), ("blue", "square"), ("green", "star")}
  assert ev_cap.named_objects("a red large circle, a circle that is blue") == set()
  assert ev_cap.named_objects("a red circle below the red circle.") == {("red", "circle")}


def test_caption_scores_by_hand():
  scene = {("red", "circle"), ("blue", "square"), ("white", "star")}
  s = ev_cap.caption_scores("a red circle left of a green square", scene,
                            ["a red circle left of a blue square"])
  assert s["named"] == [("green", "square"), ("red", "circle")]
  assert (s["hits"], s["num_named"], s["num_scene"], s["exact"]) == (1, 2, 3, False)
  assert s["recall"] == pytest.approx(1 / 3)
  assert ev_cap.caption_scores("A red circle left of a blue square.", scene,
                               ["a red circle left of a blue square ."])["exact"]


def test_score_captions_by_hand():
  scenes = [{("red", "circle"), ("blue", "square")}, {("white", "star")}, {("green", "triangle")}]
  generated = ["a red circle left of a purple star",  # 1 of 2 found, 1 of 2 named wrong
               "a white star",                        # exact, all found
               "nothing to see"]                      # names nothing
  refs = [["a red circle left of a blue square"], ["a white star"], ["a green triangle"]]
  out = ev_cap.score_captions(generated, scenes, refs, ["x", "one shape. a white star", "y"])
  assert out["exact_match"] == pytest.approx(1 / 3)
  assert out["object_recall"] == pytest.approx((0.5 + 1 + 0) / 3)
  assert out["object_precision"] == pytest.approx(2 / 3)  # micro: 2 hits of 3 named
  assert out["hallucination_rate"] == pytest.approx(1 / 3)
  assert out["hallucinated_captions"] == pytest.approx(1 / 3)
  assert out["no_object_rate"] == pytest.approx(1 / 3)
  assert out["exact_match_description"] == 0.0
  assert out["mean_words"] == pytest.approx((8 + 3 + 3) / 3)
  assert ev_cap.score_captions(["nothing"], [{("red", "star")}])["object_precision"] == 0.0


def test_derangement_and_chance():
  for n in (2, 3, 17):
    p = ev_cap.derangement(n, seed=n)
    assert sorted(p) == list(range(n)) and np.all(p != np.arange(n))
  scenes = [{("red", "circle")}, {("blue", "square")}, {("white", "star")}]
  gen = ["a red circle", "a blue square", "a white star"]
  out = ev_cap.with_chance(gen, scenes, [[g] for g in gen])
  assert out["object_recall"] == out["exact_match"] == 1.0
  assert out["chance_object_recall"] == out["chance_exact_match"] == 0.0
  assert out["chance_hallucination_rate"] == 1.0 and "chance_mean_words" not in out


# --- the evaluator through the task interface ---------------------------------------------


class _Task(base.Task):
  """Eval rows hold the reference text's ids (``answer``, EOS then padding) next to the image
  and prompt; ``generate`` returns them (or a fixed text), so the evaluator's results are
  known."""

  dataset = "shapes_captions/small"
  eval_kinds = ("image_prompt",)

  def __init__(self, config, mesh, data_dir, tok, answer="caption", fixed=None):
    super().__init__(config, mesh)
    self.data_dir, self.tok, self.answer, self.fixed = data_dir, tok, answer, fixed
    self.chat = cap.ChatEncoder(tok, "plain", num_image_tokens=2)

  def eval_transform(self, kind, **opts):
    transforms_eval = transforms.build(cap.eval_prompt_specs(prompt_len=4, **opts),
                                       chat=self.chat)

    def fn(ex):
      row = transforms_eval(ex)
      text = self.fixed if self.fixed is not None else ex[self.answer].decode()
      row["answer"] = self.tok.encode([text], 64)[0]
      return row
    return fn

  def predict_fns(self):
    def generate(params, state, batch):
      assert batch["prompt"].shape[1] == 4 and batch["image"].ndim == 4
      return batch["answer"] + 0 * params["w"]
    return {"generate": generate}

  def decode_texts(self, ids):
    return cap.decode_generated(self.tok, ids)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return cap.shapes_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _evaluator(shapes_data_dir, tok, **task_kw):
  mesh = parallel.make_mesh({"data": -1})
  task = _Task(Reader({}), mesh, shapes_data_dir, tok, **task_kw)
  cfg = Reader({"num_examples": 50, "batch_size": 16}, "config.evals.cap")
  return ev_cap.Evaluator(cfg, base.EvalView(task), mesh)


def test_reference_captions_score_one_and_are_written(shapes_data_dir, tok, tmp_path):
  ev = _evaluator(shapes_data_dir, tok)
  out = ev.run({"w": jnp.int32(1)}, None, step=7, workdir=str(tmp_path))
  assert out["exact_match"] == out["object_precision"] == out["object_recall"] == 1.0
  assert out["hallucination_rate"] == out["no_object_rate"] == 0.0
  assert out["chance_exact_match"] < 0.2 and out["chance_object_recall"] < 0.5
  assert out["chance_hallucination_rate"] > 0.5
  rows = [json.loads(line) for line in open(tmp_path / "captions" / "step_7.jsonl")]
  assert len(rows) == 50 and [r["index"] for r in rows] == list(range(50))
  assert all(r["generated"] == r["reference"] and r["exact"] for r in rows)
  assert all(r["named"] and set(map(tuple, r["named"])) <= set(map(tuple, r["objects"]))
             for r in rows)

  desc = _evaluator(shapes_data_dir, tok, answer="description").run({"w": jnp.int32(1)})
  assert desc["exact_match_description"] == desc["object_recall"] == 1.0
  assert desc["object_precision"] == 1.0 and desc["exact_match"] == 0.0


def test_a_fixed_wrong_caption_scores_lower(shapes_data_dir, tok):
  good = _evaluator(shapes_data_dir, tok, answer="description").run({"w": jnp.int32(1)})
  bad = _evaluator(shapes_data_dir, tok, fixed="a purple star above a red square").run(
      {"w": jnp.int32(1)})
  assert bad["exact_match"] == 0.0
  assert bad["object_recall"] < 0.2 < good["object_recall"]
  assert bad["object_precision"] < 0.2 and bad["hallucination_rate"] > 0.8
  # A caption that ignores the image is at chance: the same text for every image.
  assert bad["object_recall"] == bad["chance_object_recall"]
  assert good["object_recall"] > good["chance_object_recall"] + 0.5


def test_config_errors(shapes_data_dir, tok):
  mesh = parallel.make_mesh({"data": -1})
  view = base.EvalView(_Task(Reader({}), mesh, shapes_data_dir, tok))
  with pytest.raises(ConfigError, match="prediction functions generate"):
    ev_cap.Evaluator(Reader({"predict_fn": "sample"}, "e"), view, mesh)
  with pytest.raises(ConfigError, match="needs eval data"):
    ev_cap.Evaluator(Reader({"kind": "image_text"}, "e"), view, mesh)
  with pytest.raises(ConfigError, match="no scene graph"):
    ev_cap.Evaluator(Reader({"dataset": "shapes_captions/small:1.1.0", "batch_size": 8}, "e"),
                     view, mesh)
