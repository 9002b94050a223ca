"""Tokenizer: BOS/EOS/pad choices and loading a public model's tokenizer.json, checked against
Hugging Face ``tokenizers`` (and ``transformers`` when installed) encoding the same file."""

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from bigvl.config import ConfigError
from bigvl.data.tokenizer import Tokenizer, train_word_tokenizer

CORPUS = [
    "a red circle left of a blue square",
    "two green triangles above a small yellow circle",
    "the big square is below the tiny red triangle",
    "shapes on a gray background, no overlap",
] * 20
TEXTS = [
    "a red circle",
    "two green triangles above a small yellow circle left of the big blue square on gray",
    "",
    "the tiny triangle",
]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def _bpe(path, *, template: str | None = "<s> $A </s>", padding: bool = False) -> HFTokenizer:
  """A small BPE tokenizer trained here, saved as a tokenizer.json like a public model's."""
  tok = HFTokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=SPECIALS))
  if template is not None:
    tok.post_processor = _template(tok, template)
  if padding:
    tok.enable_padding(pad_id=tok.token_to_id("<unk>"), pad_token="<unk>")
  tok.save(str(path))
  return tok


def _template(tok: HFTokenizer, single: str) -> processors.TemplateProcessing:
  return processors.TemplateProcessing(
      single=single, special_tokens=[(t, tok.token_to_id(t)) for t in ("<s>", "</s>")])


def _reference(path, max_len: int, single: str | None) -> np.ndarray:
  """HF ``tokenizers`` itself: its post-processor adds the specials, its truncation and
  padding make the fixed length."""
  ref = HFTokenizer.from_file(str(path))
  ref.post_processor = _template(ref, single) if single else None
  ref.enable_truncation(max_len)
  ref.enable_padding(pad_id=ref.token_to_id("<pad>"), pad_token="<pad>", length=max_len)
  return np.array([e.ids for e in ref.encode_batch(TEXTS)], np.int32)


def test_public_tokenizer_json_reads_specials_from_template(tmp_path):
  path = tmp_path / "tokenizer.json"
  hf = _bpe(path)
  tok = Tokenizer(str(path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
      hf.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
  assert tok.add_bos and tok.add_eos and tok.vocab_size == hf.get_vocab_size()


@pytest.mark.parametrize("max_len", [4, 7, 32])
@pytest.mark.parametrize("bos,eos,single", [
    (None, None, "<s> $A </s>"), (True, False, "<s> $A"), (False, True, "$A </s>"),
    (False, False, None)])
def test_encode_matches_hf_tokenizers(tmp_path, max_len, bos, eos, single):
  path = tmp_path / "tokenizer.json"
  _bpe(path)
  got = Tokenizer(str(path)).encode(TEXTS, max_len, bos=bos, eos=eos)
  want = _reference(path, max_len, single)
  assert got.dtype == np.int32 and got.shape == (len(TEXTS), max_len)
  np.testing.assert_array_equal(got, want)
  if single and single.endswith("</s>") and max_len < 16:  # text 1 truncated: EOS kept
    assert got[1, -1] == HFTokenizer.from_file(str(path)).token_to_id("</s>")


def test_encode_matches_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  path = tmp_path / "tokenizer.json"
  _bpe(path)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(path), bos_token="<s>", eos_token="</s>", pad_token="<pad>",
      unk_token="<unk>")
  tok = Tokenizer(str(path))
  for max_len in (5, 32):
    want = fast(TEXTS, padding="max_length", truncation=True, max_length=max_len)["input_ids"]
    np.testing.assert_array_equal(tok.encode(TEXTS, max_len), np.array(want, np.int32))
  assert tok.decode(tok.encode(TEXTS[:1], 32)[0]) == fast.decode(
      fast(TEXTS[:1])["input_ids"][0], skip_special_tokens=True)


def test_specials_by_name_arguments_and_file_padding(tmp_path):
  path = tmp_path / "tokenizer.json"
  hf = _bpe(path, template=None, padding=True)
  s, e, unk = (hf.token_to_id(t) for t in ("<s>", "</s>", "<unk>"))
  tok = Tokenizer(str(path))
  # Found by name only: EOS is added, BOS is not (the file's template adds none); the pad id
  # is the file's padding setting.
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos, tok.add_eos) == (s, e, unk, False,
                                                                           True)
  ids = hf.encode(TEXTS[0], add_special_tokens=False).ids
  row = tok.encode(TEXTS[:1], 10)[0]
  np.testing.assert_array_equal(row, ids + [e] + [unk] * (9 - len(ids)))
  # Arguments win: a named BOS is added; pad by token or by id.
  tok = Tokenizer(str(path), bos="</s>", eos="<s>", pad="<pad>")
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (e, s, hf.token_to_id("<pad>"),
                                                                True)
  assert Tokenizer(str(path), pad=7, add_eos=False).encode(["x"], 3)[0, -1] == 7


def test_bert_processing_gives_cls_sep(tmp_path):
  path = tmp_path / "tokenizer.json"
  hf = _bpe(path, template=None)
  hf.post_processor = processors.BertProcessing(("</s>", hf.token_to_id("</s>")),
                                                ("<s>", hf.token_to_id("<s>")))
  hf.save(str(path))
  tok = Tokenizer(str(path))
  assert (tok.bos_id, tok.eos_id, tok.add_bos) == (hf.token_to_id("<s>"),
                                                   hf.token_to_id("</s>"), True)


def test_word_tokenizer_keeps_eos_padding_zero(tmp_path):
  tok = train_word_tokenizer(CORPUS, str(tmp_path / "word.json"), 64)
  hf = HFTokenizer.from_file(str(tmp_path / "word.json"))
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.add_bos) == (0, 2, None, False)
  got = tok.encode(TEXTS, 6)
  for row, text in zip(got, TEXTS, strict=True):
    ids = hf.encode(text).ids[:5] + [2]
    np.testing.assert_array_equal(row, ids + [0] * (6 - len(ids)))


def test_errors(tmp_path):
  tok = train_word_tokenizer(CORPUS, str(tmp_path / "word.json"), 64)
  with pytest.raises(ValueError, match="no BOS"):
    tok.encode(["a"], 4, bos=True)
  with pytest.raises(ConfigError, match="not in its vocabulary"):
    Tokenizer(str(tmp_path / "word.json"), bos="<s>")
  with pytest.raises(ConfigError, match="no BOS"):
    Tokenizer(str(tmp_path / "word.json"), add_bos=True)
  with pytest.raises(ConfigError, match="does not exist"):
    Tokenizer(str(tmp_path / "missing.json"))
  _bpe(tmp_path / "bpe.json")
  with pytest.raises(ValueError, match="shorter"):
    Tokenizer(str(tmp_path / "bpe.json")).encode(["a"], 1)
