"""Text tokenizers: a real Hugging Face ``tokenizers`` model, trained from a dataset's captions
or loaded from a ``tokenizer.json`` the config points to.

Ids: 0 = ``[PAD]``, 1 = ``[UNK]``, 2 = ``[EOS]`` (appended to every text, so the text tower
can pool at the end-of-sequence token as CLIP does).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"


class Tokenizer:
  """``encode(texts, max_len) -> int32 [N, max_len]`` padded with 0, EOS-terminated."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer as HFTokenizer

    if not os.path.exists(path):
      from bigvl.config import ConfigError
      raise ConfigError(f"tokenizer file {path!r} does not exist")
    self.path = path
    self._tok = HFTokenizer.from_file(path)
    self.pad_id = self._tok.token_to_id(PAD)
    self.eos_id = self._tok.token_to_id(EOS)
    if self.pad_id is None or self.eos_id is None:
      self.pad_id = self.pad_id or 0
      self.eos_id = self._tok.token_to_id("</s>") or self._tok.get_vocab_size() - 1

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    out = np.full((len(texts), max_len), self.pad_id, np.int32)
    for i, enc in enumerate(self._tok.encode_batch(list(texts))):
      ids = enc.ids[: max_len - 1] + [self.eos_id]
      out[i, : len(ids)] = ids
    return out

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids if i not in (self.pad_id, self.eos_id)])


def train_word_tokenizer(texts: Iterable[str], path: str, vocab_size: int = 4096) -> Tokenizer:
  """Trains a lower-cased word-level tokenizer on ``texts`` and saves it as ``path``."""
  from tokenizers import Tokenizer as HFTokenizer
  from tokenizers import models, normalizers, pre_tokenizers, trainers

  tok = HFTokenizer(models.WordLevel(unk_token=UNK))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK, EOS])
  tok.train_from_iterator(texts, trainer=trainer)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)
  return Tokenizer(path)
