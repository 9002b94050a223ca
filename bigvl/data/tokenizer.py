"""Text tokenizers: a Hugging Face ``tokenizers`` model, trained from a dataset's captions
(word level) or loaded from any ``tokenizer.json`` (a public model's BPE / Unigram / WordPiece).

Encoding is ``[BOS] text-ids [EOS] [PAD]...`` in a fixed ``max_len``; which special tokens are
added is a choice, made once per tokenizer and overridable per call:

* **BOS / EOS** tokens come from the arguments (``bos='<s>'``), else from the file's
  post-processor (a ``TemplateProcessing`` single-text template ``"<s> $A </s>"``, or
  ``BertProcessing`` / ``RobertaProcessing``'s ``cls`` / ``sep``), else from its added tokens
  by name (:data:`BOS_NAMES`, :data:`EOS_NAMES`).
* **add_bos** defaults to True when the BOS came from an argument or the template (the model
  itself adds it), False when only found by name (``<|endoftext|>`` doubles as BOS in GPT-2,
  which adds none). **add_eos** defaults to True whenever an EOS is known: the text tower
  pools at the end-of-sequence token, as CLIP does.
* **pad**: the argument (token or id), else the file's padding setting, else an added token
  named in :data:`PAD_NAMES`, else id 0.
* The file's own post-processor, truncation and padding are never applied: the ids are the
  model's ``add_special_tokens=False`` ids, and the choices above add the special tokens.
  Truncation cuts the text, never BOS or EOS: ``ids[: max_len - #special]``.

The word-level tokenizer trained here has ids 0 = ``[PAD]``, 1 = ``[UNK]``, 2 = ``[EOS]`` and no
BOS, so it encodes ``text-ids [EOS] 0 ...`` as it always has. :func:`word_tokenizer_from_vocab`
makes one from a fixed word list instead (no training pass), with more special tokens after
those three (an LVLM's ``[BOS]`` and ``<image>``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from bigvl.config import ConfigError

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
#: added-token names taken as BOS / EOS / padding when nothing else says (in this order).
BOS_NAMES = ("[BOS]", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>")
EOS_NAMES = (EOS, "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>")
PAD_NAMES = (PAD, "<pad>", "<|pad|>", "<|padding|>")


def template_specials(post_processor: dict | None) -> tuple[int | None, int | None]:
  """``(bos_id, eos_id)`` that a ``tokenizer.json`` post-processor adds around a single text:
  the special token just before / after ``$A`` of a ``TemplateProcessing`` (one id each),
  ``cls`` / ``sep`` of ``BertProcessing`` / ``RobertaProcessing``; a ``Sequence`` of
  processors gives the last one found. None where it adds nothing."""
  if not post_processor:
    return None, None
  kind = post_processor.get("type")
  if kind == "Sequence":
    bos = eos = None
    for p in post_processor.get("processors", []):
      b, e = template_specials(p)
      bos, eos = (b if b is not None else bos), (e if e is not None else eos)
    return bos, eos
  if kind in ("BertProcessing", "RobertaProcessing"):
    return int(post_processor["cls"][1]), int(post_processor["sep"][1])
  if kind != "TemplateProcessing":
    return None, None
  table = post_processor.get("special_tokens", {})

  def one_id(piece: dict) -> int | None:
    ids = table.get(piece["SpecialToken"]["id"], {}).get("ids", [])
    return int(ids[0]) if len(ids) == 1 else None

  single = post_processor.get("single", [])
  text = next((i for i, p in enumerate(single) if "Sequence" in p), None)
  if text is None:
    return None, None
  before = [p for p in single[:text] if "SpecialToken" in p]
  after = [p for p in single[text + 1:] if "SpecialToken" in p]
  return (one_id(before[-1]) if before else None), (one_id(after[0]) if after else None)


class Tokenizer:
  """``encode(texts, max_len) -> int32 [N, max_len]``: ``[BOS] ids [EOS]`` then padding.

  Args:
    path: a ``tokenizer.json`` (HF ``tokenizers.Tokenizer.from_file``).
    bos, eos: the BOS / EOS token (a string in the vocabulary); None: from the file.
    pad: the padding token or id; None: from the file, else 0.
    add_bos, add_eos: whether ``encode`` adds them by default; None: see the module docstring.
  Raises:
    ConfigError: no such file, a named token not in the vocabulary, or ``add_*`` asked for a
      token the tokenizer does not have.
  """

  def __init__(self, path: str, *, bos: str | None = None, eos: str | None = None,
               pad: str | int | None = None, add_bos: bool | None = None,
               add_eos: bool | None = None):
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(path):
      raise ConfigError(f"tokenizer file {path!r} does not exist")
    self.path = path
    self._tok = HFTokenizer.from_file(path)
    padding = self._tok.padding
    self._tok.no_padding()
    self._tok.no_truncation()
    added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
    t_bos, t_eos = template_specials(json.loads(self._tok.to_str()).get("post_processor"))

    def by_name(names: Sequence[str]) -> int | None:
      return next((added[n] for n in names if n in added), None)

    self.bos_id = self._id(bos, "bos") if bos is not None else (
        t_bos if t_bos is not None else by_name(BOS_NAMES))
    self.eos_id = self._id(eos, "eos") if eos is not None else (
        t_eos if t_eos is not None else by_name(EOS_NAMES))
    if pad is not None:
      self.pad_id = pad if isinstance(pad, int) else self._id(pad, "pad")
    elif padding is not None:
      self.pad_id = int(padding["pad_id"])
    else:
      found = by_name(PAD_NAMES)
      self.pad_id = 0 if found is None else found
    self.add_bos = (bos is not None or t_bos is not None) if add_bos is None else add_bos
    self.add_eos = (self.eos_id is not None) if add_eos is None else add_eos
    try:
      self.specials()
    except ValueError as e:
      raise ConfigError(f"tokenizer {path}: {e}") from None

  def _id(self, token: str, what: str) -> int:
    i = self._tok.token_to_id(token)
    if i is None:
      raise ConfigError(f"tokenizer {self.path}: {what} token {token!r} is not in its "
                        f"vocabulary")
    return i

  def token_id(self, token: str) -> int:
    """The id of ``token`` (e.g. ``'<image>'``); ConfigError if it is not in the vocabulary."""
    return self._id(token, "the")

  @property
  def unk_id(self) -> int | None:
    """The id of ``[UNK]`` (the word-level tokenizers'), None if there is none."""
    return self._tok.token_to_id(UNK)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def specials(self, bos: bool | None = None, eos: bool | None = None
               ) -> tuple[list[int], list[int]]:
    """``(prefix, suffix)`` ids around a text: ``[bos_id]`` if ``bos`` (None: ``add_bos``),
    ``[eos_id]`` if ``eos`` (None: ``add_eos``). ValueError for a token the tokenizer lacks."""
    bos = self.add_bos if bos is None else bos
    eos = self.add_eos if eos is None else eos
    for want, have, what in ((bos, self.bos_id, "BOS"), (eos, self.eos_id, "EOS")):
      if want and have is None:
        raise ValueError(f"{what} requested but the tokenizer has no {what} token (name one "
                         f"with the {what.lower()}= argument)")
    return ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])

  def ids(self, texts: Sequence[str], *, max_len: int | None = None,
          bos: bool | None = None, eos: bool | None = None) -> list[list[int]]:
    """Unpadded ids per text: ``prefix + text_ids[:max_len - #special] + suffix``."""
    prefix, suffix = self.specials(bos, eos)
    room = None if max_len is None else max_len - len(prefix) - len(suffix)
    if room is not None and room < 0:
      raise ValueError(f"max_len={max_len} is shorter than the special tokens")
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [prefix + enc.ids[:room] + suffix for enc in encs]

  def encode(self, texts: Sequence[str], max_len: int, *, bos: bool | None = None,
             eos: bool | None = None, pad_id: int | None = None) -> np.ndarray:
    """int32 ``[len(texts), max_len]``: :meth:`ids` right-padded with ``pad_id`` (None: the
    tokenizer's)."""
    pad_id = self.pad_id if pad_id is None else pad_id
    out = np.full((len(texts), max_len), pad_id, np.int32)
    for i, row in enumerate(self.ids(texts, max_len=max_len, bos=bos, eos=eos)):
      out[i, :len(row)] = row
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids`` without padding, BOS, EOS or other special tokens."""
    drop = {self.pad_id, self.bos_id, self.eos_id}
    return self._tok.decode([int(i) for i in ids if int(i) not in drop])

  def __repr__(self) -> str:
    return (f"Tokenizer({self.path!r}, vocab={self.vocab_size}, bos={self.bos_id}"
            f"{'+' if self.add_bos else ''}, eos={self.eos_id}{'+' if self.add_eos else ''}, "
            f"pad={self.pad_id})")


def _word_level(vocab: dict[str, int] | None = None) -> Any:
  """An HF word-level tokenizer: NFKC + lower case, split on whitespace and punctuation."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import models, normalizers, pre_tokenizers

  tok = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return tok


def _save(tok: Any, path: str) -> None:
  """Writes ``tok`` to ``path`` atomically (other processes may read it meanwhile)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)


def train_word_tokenizer(texts: Iterable[str], path: str, vocab_size: int = 4096) -> Tokenizer:
  """Trains a lower-cased word-level tokenizer on ``texts`` and saves it as ``path``."""
  from tokenizers import trainers

  tok = _word_level()
  trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS])
  tok.train_from_iterator(texts, trainer=trainer)
  _save(tok, path)
  return Tokenizer(path)


def word_tokenizer_from_vocab(words: Iterable[str], path: str,
                              extra_specials: Sequence[str] = (), **kwargs: Any) -> Tokenizer:
  """A word-level tokenizer (as :func:`train_word_tokenizer`'s) with a fixed vocabulary, saved
  as ``path``: ids ``[PAD]`` 0, ``[UNK]`` 1, ``[EOS]`` 2, then ``extra_specials`` (special:
  matched before normalisation, dropped by ``decode``), then ``words`` (lower-cased,
  duplicates dropped) in order. ``kwargs`` go to :class:`Tokenizer` (``bos='[BOS]'``, ...).
  The file is rewritten only if its content would change."""
  specials = [PAD, UNK, EOS] + [t for t in extra_specials if t not in (PAD, UNK, EOS)]
  vocab: dict[str, int] = {}
  for w in [*specials, *(w.lower() for w in words)]:
    vocab.setdefault(w, len(vocab))
  tok = _word_level(vocab)
  tok.add_special_tokens(specials)
  old = None
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  if old != tok.to_str():
    _save(tok, path)
  return Tokenizer(path, **kwargs)
