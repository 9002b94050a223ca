"""LVLM captioning data: shapes_captions 1.2.0 (scene graph, description; 1.1.0 bitwise as
before), chat templates, the loss mask, packing (rows, resume, padding statistics)."""

import hashlib

import numpy as np
import pytest

from bigvl.config import ConfigError
from bigvl.data import captioning as cap
from bigvl.data import sources, transforms
from bigvl.data.builders import shapes_captions as sc

N = 4  # image tokens per image in these tests

#: sha256 of every split of shapes_captions/small 1.1.0 (image bytes, captions, label,
#: scene id), computed with the 1.1.0 code before 1.2.0 was added.
GOLDEN_1_1_0 = {
    "train": "2cc06349c8ab65a268d60e7c6b2417f84d56f7f04ebf12f185bb8d02f94cf819",
    "validation": "cd6c20a592729e2a558311e39c279cd573b6608a1e4d2c30ec7371620d2cc6d9",
    "test": "f729b98ec6e22bb5ef01ea430488fbbe5fb6f61bfa6775441cf2458f4f63f266",
}
#: the same of the generator of a dups-like config (jittered prototypes), 1.1.0 code.
GOLDEN_DUPS_GENERATOR = "5788369c2e1daf1da3f4c8cdcc394e8a02d92068cc432c32113308fe97fc688b"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return cap.shapes_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


# --- the dataset --------------------------------------------------------------------------


def test_version_1_1_0_prepares_the_old_examples_bitwise(tmp_path):
  for split, want in GOLDEN_1_1_0.items():
    src, info = sources.get_source("shapes_captions/small:1.1.0", split, str(tmp_path))
    assert str(info.version) == "1.1.0" and "objects" not in info.features
    h = hashlib.sha256()
    for i in range(len(src)):
      ex = src[i]
      assert set(ex) == {"image", "captions", "label", "scene_id"}
      h.update(np.ascontiguousarray(ex["image"]).tobytes())
      for c in ex["captions"]:
        h.update(c + b"\0")
      h.update(str((int(ex["label"]), int(ex["scene_id"]))).encode())
    assert h.hexdigest() == want, split


@pytest.mark.parametrize("version", ["1.1.0", "1.2.0"])
def test_generator_keeps_the_1_1_0_fields_bitwise(tmp_path, version):
  """1.2.0 adds fields without random draws: the old fields are the old bytes in both."""
  cfg = sc.ShapesConfig(name="t", num_train=200, num_test=50, num_prototypes=10,
                        dup_fraction=0.5)
  b = sc.ShapesCaptions(config=cfg, data_dir=str(tmp_path), version=version)
  h = hashlib.sha256()
  for split, n, k in (("train", 200, 0), ("test", 50, 2)):
    for key, ex in b._generate_examples(split, n, k):
      assert ("objects" in ex) == (version == "1.2.0")
      h.update(str(key).encode())
      h.update(ex["image"].tobytes())
      for c in ex["captions"]:
        h.update(c.encode() + b"\0")
      h.update(str((ex["label"], ex["scene_id"])).encode())
  assert h.hexdigest() == GOLDEN_DUPS_GENERATOR


def test_1_2_0_has_the_scene_graph_and_descriptions(shapes_data_dir):
  src, info = sources.get_source("shapes_captions/small", "train", shapes_data_dir)
  assert str(info.version) == "1.2.0"
  for i in range(40):
    ex = src[i]
    colors = [c.decode() for c in ex["objects"]["color"]]
    shapes = [s.decode() for s in ex["objects"]["shape"]]
    assert f"{colors[0]} {shapes[0]}" == info.features["label"].names[ex["label"]]
    desc, caption = ex["description"].decode(), ex["caption"].decode()
    assert caption.encode() in list(ex["captions"])
    for c, s in zip(colors, shapes, strict=True):  # every object is described
      assert f"{c} {s} at the" in desc
    assert desc.startswith(["one shape.", "two shapes.", "three shapes.",
                            "four shapes."][len(colors) - 1])


def test_description_is_a_function_of_the_scene():
  objs = [{"color": "red", "shape": "circle", "x": 0.2, "y": 0.2, "r": 0.16},
          {"color": "blue", "shape": "square", "x": 0.8, "y": 0.5, "r": 0.13},
          {"color": "white", "shape": "star", "x": 0.5, "y": 0.9, "r": 0.1}]
  assert sc.describe(objs) == (
      "three shapes. a large red circle at the top left. a blue square at the right, right of "
      "the red circle. a small white star at the bottom, below the red circle.")
  assert sc.canonical_caption(objs) == ("a red circle left of a blue square and a white star")
  graph = sc.scene_graph(objs)
  assert graph["color"] == ["red", "blue", "white"] and graph["size"] == ["large", "medium",
                                                                          "small"]


def test_vocabulary_covers_every_text(tok):
  rng = np.random.default_rng(1)
  vocab = set(sc.vocabulary())
  for _ in range(300):
    objs = sc.sample_scene(rng)
    sft = sc.sft_fields(sc.add_partner(objs, rng, 0.7), rng, 0.5)  # the cooc config's texts
    for text in sc.captions(objs, rng) + [sc.describe(objs), sc.canonical_caption(objs),
                                          *sft.values()]:
      assert set(sc.WORD_RE.findall(text)) <= vocab, text
      assert 1 not in tok.ids([text])[0]  # no [UNK]
  for q in cap.load_questions().values():
    assert 1 not in tok.ids([q])[0]


# --- tokenizer and templates --------------------------------------------------------------


def test_shapes_tokenizer_is_fixed(tok, tmp_path):
  other = cap.shapes_tokenizer(str(tmp_path / "t.json"))
  with open(tok.path) as a, open(other.path) as b:
    assert a.read() == b.read()
  assert (tok.pad_id, 1, tok.eos_id, tok.bos_id, tok.token_id(cap.IMAGE)) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("name", ["plain", "vicuna_v1"])
def test_encode_masks_the_answer_and_its_eos_only(tok, name):
  chat = cap.ChatEncoder(tok, name, num_image_tokens=N)
  answer = "a red circle left of a blue square"
  enc = chat.encode(answer)
  tokens, mask = enc["tokens"], enc["loss_mask"]
  prompt = chat.prompt_ids()
  ans = tok.ids([answer], bos=False, eos=False)[0]
  assert tokens.dtype == mask.dtype == np.int32
  assert tokens.tolist() == prompt + ans + [tok.eos_id]
  assert mask.tolist() == [0] * len(prompt) + [1] * (len(ans) + 1)
  assert prompt[0] == tok.bos_id and prompt.count(chat.image_token_id) == N
  image_at = prompt.index(chat.image_token_id)
  assert prompt[image_at:image_at + N] == [chat.image_token_id] * N
  if name == "plain":
    assert prompt == [tok.bos_id] + [chat.image_token_id] * N
  else:
    text = tok.decode(prompt)
    assert text.startswith("a chat between") and text.endswith(
        "user : provide a one - sentence caption for the provided image . assistant :")
    assert cap.decode_generated(tok, tokens[None, len(prompt):]) == [answer]


@pytest.mark.parametrize("name", ["plain", "vicuna_v1"])
def test_soft_prompt_placeholders_go_where_the_template_says(tok, name):
  plain = cap.ChatEncoder(tok, name, num_image_tokens=N).prompt_ids()
  soft = cap.ChatEncoder(tok, name, num_image_tokens=N, soft_prompt_id=999,
                         num_soft_prompt_tokens=3).prompt_ids()
  at = plain.index(tok.token_id(cap.IMAGE))  # the templates put them right before the image
  assert soft == plain[:at] + [999] * 3 + plain[at:]


def test_truncation_cuts_the_answer_and_its_eos(tok):
  chat = cap.ChatEncoder(tok, "plain", num_image_tokens=N)
  enc = chat.encode("a red circle left of a blue square", max_len=N + 4)
  assert enc["tokens"].tolist()[N + 1:] == tok.ids(["a red circle"], bos=False, eos=False)[0]
  assert tok.eos_id not in enc["tokens"].tolist()
  with pytest.raises(ValueError, match="no room"):
    chat.encode("a red circle", max_len=N + 1)


def test_prompt_row_is_left_padded_and_decode_stops_at_eos(tok):
  chat = cap.ChatEncoder(tok, "vicuna_v1", num_image_tokens=N)
  p = len(chat.prompt_ids("description"))
  row = chat.prompt_row("description", p + 3)
  assert row["prompt"][:3].tolist() == [0] * 3 and row["prompt_mask"].tolist() == [0] * 3 + [1] * p
  assert row["prompt"][3:].tolist() == chat.prompt_ids("description")
  assert "describe the image in detail" in tok.decode(row["prompt"])
  with pytest.raises(ValueError, match="more than"):
    chat.prompt_row(None, 5)
  ids = np.array([[10, 11, tok.eos_id, 12, 0], [10, 0, 0, 0, 0]])
  out = cap.decode_generated(tok, ids)
  assert out == [tok.decode([10, 11]), tok.decode([10])]


def test_answer_row_is_the_encoding_right_padded(tok):
  chat = cap.ChatEncoder(tok, "question", num_image_tokens=N)
  q = "is there a red circle in the image ?"
  enc = chat.encode("yes", q)
  row = chat.answer_row("yes", q, len(enc["tokens"]) + 5)
  n = len(enc["tokens"])
  assert row["tokens"][:n].tolist() == enc["tokens"].tolist()
  assert row["tokens"][n:].tolist() == [tok.pad_id] * 5 and row["loss_mask"][n:].sum() == 0
  assert tok.decode(row["tokens"][row["loss_mask"] == 1]) == "yes"
  assert tok.decode(chat.prompt_ids(q)).endswith(q)  # the literal question, no system text


def test_per_example_questions(tok):
  """``question='@key'`` reads each example's own question (VQA-style data)."""
  chat = cap.ChatEncoder(tok, "question", num_image_tokens=N)
  t = transforms.build(cap.train_specs(max_len=64, answer_key="answer", question="@question"),
                       chat=chat)
  for q, a in (("is there a red circle in the image ?", "yes"),
               ("is there a blue star in the image ?", "no")):
    out = t({"image": np.zeros((8, 8, 3), np.uint8), "question": q.encode(),
             "answer": a.encode()}, np.random.default_rng(0))
    assert out["tokens"].tolist() == chat.encode(a, q)["tokens"].tolist()


def test_bad_templates_are_config_errors(tok):
  with pytest.raises(ConfigError, match="unknown chat template"):
    cap.ChatEncoder(tok, "llama9", num_image_tokens=N)
  with pytest.raises(ConfigError, match="exactly once"):
    cap.ChatTemplate(name="x", prompt="no image here")


def test_ops_from_specs(tok):
  chat = cap.ChatEncoder(tok, "vicuna_v1", num_image_tokens=N)
  ex = {"image": np.full((8, 8, 3), 255, np.uint8), "caption": b"a red circle",
        "description": b"one shape. a red circle at the top.", "captions": [b"x", b"y"]}
  t = transforms.build(cap.train_specs(max_len=96, answer_key=["caption", "description"],
                                       question=["caption", "description"]), chat=chat)
  seen = set()
  rng = np.random.default_rng(0)
  for _ in range(20):
    out = t(ex, rng)
    assert set(out) == {"image", "tokens", "loss_mask"} and out["image"].dtype == np.float32
    np.testing.assert_array_equal(out["image"], 1.0)
    answer = tok.decode(out["tokens"][out["loss_mask"] == 1])
    question = "detail" if "in detail ." in tok.decode(out["tokens"]) else "caption"
    seen.add((answer, question))
  assert seen == {("a red circle", "caption"),
                  ("one shape . a red circle at the top .", "detail")}
  ev = transforms.build(cap.eval_prompt_specs(prompt_len=80), chat=chat)
  row = ev(ex)  # deterministic: no generator
  assert set(row) == {"image", "prompt", "prompt_mask"}
  assert row["prompt"][row["prompt_mask"] == 1].tolist() == chat.prompt_ids()
  with pytest.raises(ConfigError, match="no room"):
    transforms.build(["chat_encode(max_len=20)"], chat=chat)
  with pytest.raises(ConfigError, match="needs a chat"):
    transforms.build(["chat_encode()"])


# --- packing ------------------------------------------------------------------------------


def _example(i: int, n: int) -> dict:
  """An encoded example of ``n`` tokens: ids 100*i + (1..n), loss on the second half."""
  return {"tokens": np.arange(1, n + 1, dtype=np.int32) + 100 * i,
          "loss_mask": (np.arange(n) >= n // 2).astype(np.int32),
          "image": np.full((2, 2, 3), i + 1, np.float32)}


def test_pack_row():
  row = cap.pack_row([_example(0, 3), _example(1, 4)], seq_len=10, max_images=3, pad_id=7)
  assert row["tokens"].tolist() == [1, 2, 3, 101, 102, 103, 104, 7, 7, 7]
  assert row["loss_mask"].tolist() == [0, 1, 1, 0, 0, 1, 1, 0, 0, 0]
  assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0, 0, 0]
  assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0, 0]
  assert row["images"].shape == (3, 2, 2, 3) and row["images"].dtype == np.float32
  assert [float(x) for x in row["images"][:, 0, 0, 0]] == [1.0, 2.0, 0.0]
  with pytest.raises(ValueError, match="do not fit"):
    cap.pack_row([_example(0, 6), _example(1, 5)], seq_len=10, max_images=3)


class _ListSource:
  def __init__(self, items):
    self.items = items

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


def _iterator(lengths, seed=0, **kw):
  src = _ListSource([{"i": i, "n": n} for i, n in enumerate(lengths)])
  return cap.train_iterator(src, lambda ex, rng: _example(ex["i"], ex["n"]), batch_size=2,
                            seed=seed, num_threads=1, **kw)


def test_train_iterator_packs_every_example_and_resumes_exactly():
  lengths = list(np.random.default_rng(0).integers(2, 9, size=40))
  it = _iterator(lengths, seq_len=16, max_images=3)
  batches = [next(it) for _ in range(12)]
  b = batches[0]
  assert set(b) == {"images", "tokens", "loss_mask", "segment_ids", "positions"}
  assert b["images"].shape == (2, 3, 2, 2, 3) and b["images"].dtype == np.float32
  for k in ("tokens", "loss_mask", "segment_ids", "positions"):
    assert b[k].shape == (2, 16) and b[k].dtype == np.int32
  # Every example of the first epoch appears whole, once, with its own image.
  seen = []
  for batch in batches:
    for r in range(2):
      for s in range(1, 4):
        at = batch["segment_ids"][r] == s
        if not at.any():
          assert not batch["images"][r, s - 1].any()  # no example: a zero image
          continue
        i = int(batch["images"][r, s - 1, 0, 0, 0]) - 1
        np.testing.assert_array_equal(batch["tokens"][r][at], _example(i, lengths[i])["tokens"])
        np.testing.assert_array_equal(batch["positions"][r][at], np.arange(lengths[i]))
        seen.append(i)
  assert len(seen) >= 40 and set(seen[:40]) == set(range(40))
  # Resume from the state after any batch gives the same next batches.
  for cut in (1, 4, 7):
    it = _iterator(lengths, seq_len=16, max_images=3)
    for _ in range(cut):
      next(it)
    state = it.get_state()
    again = _iterator(lengths, seq_len=16, max_images=3)
    next(again)  # a state of its own first
    again.set_state(state)
    for want in batches[cut:cut + 3]:
      got = next(again)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_padding_stats_match_the_packed_rows():
  lengths = [int(n) for n in np.random.default_rng(1).integers(3, 13, size=64)]
  st = cap.padding_stats(lengths, seq_len=32, max_images=4, unpacked_len=12)
  assert st["pad_fraction_unpacked"] == pytest.approx(1 - sum(lengths) / (64 * 12))
  # Rows of the iterator (no shuffle: stream order) have exactly that padding.
  it = _iterator(lengths, seq_len=32, max_images=4, shuffle=False)
  segs, count = [], 0
  while count < 64:
    b = next(it)
    for row in b["segment_ids"]:
      if count < 64:
        segs.append(row)
        count += int(row.max())
  assert count == 64
  assert st["pad_fraction_packed"] == pytest.approx(cap.row_pad_fraction(np.stack(segs)))
  assert st["examples_per_row"] == pytest.approx(64 / len(segs))
  assert st["pad_fraction_packed"] < st["pad_fraction_unpacked"]
  # max_images=1 is the unpacked baseline at seq_len
  one = cap.padding_stats(lengths, seq_len=12, max_images=1)
  assert one["pad_fraction_packed"] == pytest.approx(st["pad_fraction_unpacked"])
  assert cap.padding_stats([4, 4, 4], seq_len=8, max_images=2)["pad_fraction_packed"] == 0.25
