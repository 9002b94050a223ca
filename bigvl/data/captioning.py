"""LVLM captioning data: chat templates (data), host-side encoding, packing, and the word-level
tokenizer of the shapes vocabulary.

**Templates** (``bigvl/data/chat_templates.json``, :func:`load_templates`): a template's
``prompt`` is everything before the answer, with ``{system}``, ``{question}`` and one
``<image>``; ``answer`` holds ``{answer}``; ``bos`` / ``eos`` say whether a BOS starts the row
and an EOS ends the answer. ``plain`` is LLaVA stage 1 (``<image>`` then the caption),
``vicuna_v1`` LLaVA-1.5 (``"{system} USER: <image>\\n{question} ASSISTANT: {answer}</s>"``).
Questions are named (``'caption'``, ``'description'``) in the file's ``questions`` table, or
given as literal text.

**One example** (:class:`ChatEncoder`), with ``N = num_image_tokens`` (the vision tower's)::

    tokens    = [BOS] prompt(<image> -> N x image_token_id) answer [EOS]
    loss_mask =   0      0 ... 0  (prompt and image tokens)   1 ... 1  1

Generation (eval) uses the prompt alone, left-padded to a fixed length: ``prompt [P]``,
``prompt_mask [P]`` (1 on real tokens); the model generates from just after it and stops at
EOS (:func:`decode_generated` cuts there).

**Packing** (:func:`pack_row`, :class:`PackIterDataset`): encoded examples are packed greedily,
in stream order, into rows of ``T = seq_len`` slots holding at most ``k = max_images``
examples; an example starts a new row when it does not fit (length or image count). A row::

    tokens      [T] int32    the examples' tokens one after the other, then pad_id
    loss_mask   [T] int32    the examples' loss masks concatenated, 0 on padding
    segment_ids [T] int32    j (1..k) on the slots of the row's j-th example, 0 on padding
    positions   [T] int32    0, 1, ... restarting at every segment, 0 on padding
    images      [k, H, W, C] float32: image j-1 for segment j, zeros where the row has fewer

so the ``<image>`` placeholders of a row are its images' in order (``bigvl.models.splice``);
``max_images=1`` is the unpacked baseline in the same format. Packing saves the padding
(:func:`padding_stats`: the fraction of token slots that are padding with and without it).

**What a task calls** (train)::

    tok = shapes_tokenizer(os.path.join(data_dir, 'shapes_captions_lvlm', 'tokenizer.json'))
    chat = ChatEncoder(tok, 'vicuna_v1', num_image_tokens=N)
    transform = transforms.build(train_specs(answer_key='caption', max_len=T), chat=chat)
    data = train_iterator(source, transform, batch_size=B_host, seed=seed, seq_len=T,
                          max_images=k, pad_id=tok.pad_id)
    # batches {images [B,k,H,W,C] f32, tokens, loss_mask, segment_ids, positions [B,T] i32}

and eval (``eval_transform('image_prompt')``)::

    transforms.build(eval_prompt_specs(prompt_len=P), chat=chat)
    # rows {image [H,W,C] f32, prompt [P] i32 (left-padded), prompt_mask [P] i32}
    decode_texts = lambda ids: decode_generated(tok, ids)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from bigvl.config import ConfigError
from bigvl.data import pipeline
from bigvl.data.tokenizer import Tokenizer, word_tokenizer_from_vocab

#: the image placeholder of templates; expanded to ``num_image_tokens`` copies of its id.
IMAGE = "<image>"
#: where a template puts the learned soft-prompt vectors (``bigvl.models.soft_prompt``):
#: ``K`` copies of the model's soft-prompt id, or nothing when the model has none.
SOFT_PROMPT = "<soft_prompt>"
BOS = "[BOS]"
TEMPLATES_PATH = os.path.join(os.path.dirname(__file__), "chat_templates.json")
#: the keys of one packed row (:func:`pack_row`), besides ``images``.
ROW_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """One prompt format (module docstring)."""

  name: str
  prompt: str
  answer: str = "{answer}"
  system: str = ""
  bos: bool = True
  eos: bool = True
  description: str = ""

  def __post_init__(self):
    if self.prompt.count(IMAGE) != 1:
      raise ConfigError(f"chat template {self.name!r}: the prompt must hold {IMAGE} exactly "
                        f"once, got {self.prompt!r}")
    if "{answer}" not in self.answer:
      raise ConfigError(f"chat template {self.name!r}: the answer must hold '{{answer}}', got "
                        f"{self.answer!r}")


@functools.lru_cache(maxsize=8)
def _read(path: str) -> tuple[dict[str, ChatTemplate], dict[str, str]]:
  with open(path) as f:
    data = json.load(f)
  fields = {f.name for f in dataclasses.fields(ChatTemplate)} - {"name"}
  templates = {}
  for name, spec in data["templates"].items():
    unknown = sorted(set(spec) - fields)
    if unknown:
      raise ConfigError(f"{path}: template {name!r} has unknown fields {unknown}")
    templates[name] = ChatTemplate(name=name, **spec)
  return templates, dict(data.get("questions", {}))


def load_templates(path: str | None = None) -> dict[str, ChatTemplate]:
  """``{name: ChatTemplate}`` from ``path`` (default :data:`TEMPLATES_PATH`)."""
  return dict(_read(path or TEMPLATES_PATH)[0])


def load_questions(path: str | None = None) -> dict[str, str]:
  """The named questions (``{'caption': ..., 'description': ...}``) of the templates file."""
  return dict(_read(path or TEMPLATES_PATH)[1])


def load_summary_prompts(path: str | None = None) -> dict:
  """The discriminative summary prompts of the templates file: ``{'default': {'image',
  'text'}, 'candidates': [{'image', 'text'}, ...]}`` (``bigvl.tasks.lvlm_disc``)."""
  with open(path or TEMPLATES_PATH) as f:
    data = json.load(f)["summary_prompts"]
  return {"default": data["default"], "candidates": list(data["candidates"])}


def template_words(path: str | None = None) -> list[str]:
  """Every word or punctuation mark of the file's templates and questions (lower case)."""
  from bigvl.data.builders.shapes_captions import WORD_RE

  texts = list(load_questions(path).values())
  prompts = load_summary_prompts(path)
  for pair in [prompts["default"], *prompts["candidates"]]:
    texts += [pair["image"], pair["text"]]
  for t in load_templates(path).values():
    texts += [t.system, t.prompt.replace(IMAGE, " ").replace(SOFT_PROMPT, " "), t.answer]
  words = set()
  for text in texts:
    text = text.replace("{system}", " ").replace("{question}", " ").replace("{answer}", " ")
    words.update(WORD_RE.findall(text.lower()))
  return sorted(words)


def shapes_tokenizer(path: str, templates_path: str | None = None) -> Tokenizer:
  """The word-level tokenizer of ``shapes_captions`` (>= 1.2.0) + the chat templates, saved as
  ``path`` (rewritten only if it would change): ids ``[PAD]`` 0, ``[UNK]`` 1, ``[EOS]`` 2,
  ``[BOS]`` 3, ``<image>`` 4, then the sorted words of ``shapes_captions.vocabulary()`` and
  :func:`template_words`. A fixed list, so every process builds the same file."""
  from bigvl.data.builders.shapes_captions import vocabulary

  words = sorted(set(vocabulary()) | set(template_words(templates_path)))
  return word_tokenizer_from_vocab(words, path, extra_specials=(BOS, IMAGE), bos=BOS)


class ChatEncoder:
  """Encodes examples with one template (module docstring).

  Args:
    tokenizer: a :class:`Tokenizer` with an ``<image>`` token, and a BOS / EOS token if the
      template uses them.
    template: a name in ``templates`` or a :class:`ChatTemplate`.
    num_image_tokens: ``N``, the placeholders per image (the vision tower's token count).
    default_question: the question of ``encode`` / ``prompt_ids`` when none is given.
    templates_path: the templates file (default :data:`TEMPLATES_PATH`).
  """

  def __init__(self, tokenizer: Tokenizer, template: str | ChatTemplate,
               num_image_tokens: int, *, default_question: str = "caption",
               templates_path: str | None = None, image_token: str = IMAGE,
               soft_prompt_id: int | None = None, num_soft_prompt_tokens: int = 0):
    if isinstance(template, str):
      known = load_templates(templates_path)
      if template not in known:
        raise ConfigError(f"unknown chat template {template!r}; known: {', '.join(known)}")
      template = known[template]
    if not isinstance(num_image_tokens, int) or num_image_tokens <= 0:
      raise ConfigError(f"num_image_tokens must be a positive int, got {num_image_tokens!r}")
    self.tokenizer, self.template, self.num_image_tokens = tokenizer, template, num_image_tokens
    self.questions = load_questions(templates_path)
    self.default_question = default_question
    self.image_token_id = tokenizer.token_id(image_token)
    if num_soft_prompt_tokens and soft_prompt_id is None:
      raise ConfigError("soft prompt tokens need the model's soft_prompt_id")
    self.soft_prompt_ids = [soft_prompt_id] * num_soft_prompt_tokens
    for want, have, what in ((template.bos, tokenizer.bos_id, "BOS"),
                             (template.eos, tokenizer.eos_id, "EOS")):
      if want and have is None:
        raise ConfigError(f"chat template {template.name!r} needs a {what} token, which "
                          f"tokenizer {tokenizer} lacks")
    self._prompts: dict[str, list[int]] = {}

  @property
  def pad_id(self) -> int:
    return self.tokenizer.pad_id

  def question_text(self, question: str | None = None) -> str:
    """A named question's text (``questions`` table), else ``question`` itself."""
    question = self.default_question if question is None else question
    return self.questions.get(question, question)

  def _text_ids(self, text: str) -> list[int]:
    return self.tokenizer.ids([text], bos=False, eos=False)[0] if text.strip() else []

  def prompt_ids(self, question: str | None = None) -> list[int]:
    """``[BOS] prompt`` with ``<image>`` as ``N`` placeholder ids and ``<soft_prompt>`` as
    the soft-prompt ids (none without a soft prompt): where generation starts."""
    q = self.question_text(question)
    if q not in self._prompts:
      t = self.template
      text = t.prompt.replace("{system}", t.system).replace("{question}", q)
      ids = [self.tokenizer.bos_id] if t.bos else []
      for piece in re.split(f"({re.escape(IMAGE)}|{re.escape(SOFT_PROMPT)})", text):
        ids += ([self.image_token_id] * self.num_image_tokens if piece == IMAGE else
                self.soft_prompt_ids if piece == SOFT_PROMPT else self._text_ids(piece))
      self._prompts[q] = ids
    return list(self._prompts[q])

  def answer_ids(self, answer: str) -> list[int]:
    """The answer's ids, then EOS if the template ends answers with one."""
    ids = self._text_ids(self.template.answer.replace("{answer}", answer))
    return ids + ([self.tokenizer.eos_id] if self.template.eos else [])

  def encode(self, answer: str, question: str | None = None, max_len: int | None = None
             ) -> dict[str, np.ndarray]:
    """``{'tokens': int32 [L], 'loss_mask': int32 [L]}`` (unpadded, ``L <= max_len``).

    Beyond ``max_len`` the answer is cut, and its EOS with it (a cut answer must not teach
    the model to stop there). A prompt that leaves no room for one answer token is an error.
    """
    prompt, ans = self.prompt_ids(question), self.answer_ids(answer)
    if max_len is not None:
      if len(prompt) >= max_len:
        raise ValueError(f"max_len={max_len} leaves no room for the answer after a prompt of "
                         f"{len(prompt)} tokens")
      ans = ans[:max_len - len(prompt)]
    tokens = np.asarray(prompt + ans, np.int32)
    mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(ans), np.int32)])
    return {"tokens": tokens, "loss_mask": mask}

  def answer_row(self, answer: str, question: str | None, length: int
                 ) -> dict[str, np.ndarray]:
    """:meth:`encode` right-padded to ``length`` (``pad_id``, mask 0): one fixed-shape row
    ``{'tokens', 'loss_mask'}`` for scoring an answer (its log-probability) or DPO."""
    enc = self.encode(answer, question, length)
    n = len(enc["tokens"])
    tokens = np.full(length, self.pad_id, np.int32)
    mask = np.zeros(length, np.int32)
    tokens[:n], mask[:n] = enc["tokens"], enc["loss_mask"]
    return {"tokens": tokens, "loss_mask": mask}

  def prompt_row(self, question: str | None, length: int) -> dict[str, np.ndarray]:
    """``{'prompt': int32 [length], 'prompt_mask': int32 [length]}``: the generation prompt
    left-padded with ``pad_id`` (mask 0), so every row's last prompt token is at ``length - 1``
    and generation continues at ``length``. ValueError if the prompt is longer."""
    ids = self.prompt_ids(question)
    if len(ids) > length:
      raise ValueError(f"the generation prompt has {len(ids)} tokens, more than "
                       f"prompt_len={length}")
    prompt = np.full(length, self.pad_id, np.int32)
    mask = np.zeros(length, np.int32)
    if ids:
      prompt[-len(ids):], mask[-len(ids):] = ids, 1
    return {"prompt": prompt, "prompt_mask": mask}


def decode_generated(tokenizer: Tokenizer, ids: np.ndarray) -> list[str]:
  """Generated ids ``[B, L]`` -> texts: each row up to its first EOS, without padding or
  special tokens (``Tokenizer.decode``)."""
  out = []
  for row in np.asarray(ids):
    row = [int(i) for i in row]
    if tokenizer.eos_id is not None and tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    out.append(tokenizer.decode(row))
  return out


# ---------------------------------------------------------------------------------------------
# Pipelines as transform specs (the ops ``chat_encode`` / ``chat_prompt`` are in
# bigvl.data.transforms; they take the ChatEncoder as the context object ``chat``).
# ---------------------------------------------------------------------------------------------


def image_specs(image_size: int | None, image_key: str = "image",
                value_range: tuple[float, float] = (-1.0, 1.0)) -> list[str]:
  """Ops: the image as float32 in ``value_range``, resized to ``image_size`` if given."""
  specs = [] if image_key == "image" else [f"copy({{{image_key!r}: 'image'}})"]
  if image_size is not None:
    specs.append(f"resize({int(image_size)})")
  return specs + [f"value_range({float(value_range[0])}, {float(value_range[1])})"]


def train_specs(*, max_len: int, answer_key: str | Sequence[str] = "caption",
                question: str | Sequence[str] | None = None, image_size: int | None = None,
                image_key: str = "image", value_range: tuple[float, float] = (-1.0, 1.0)
                ) -> list[str]:
  """The per-example train pipeline: the image as float32 in ``value_range`` (resized if
  ``image_size``), then ``chat_encode`` of the answer ``example[answer_key]`` (several keys:
  one drawn per example, with its question) -> ``{image, tokens [L], loss_mask [L]}``."""
  return image_specs(image_size, image_key, value_range) + [
      f"chat_encode(answer_key={_literal(answer_key)}, question={_literal(question)}, "
      f"max_len={int(max_len)})",
      "keep(('image', 'tokens', 'loss_mask'))"]


def eval_prompt_specs(*, prompt_len: int, question: str | None = None,
                      image_size: int | None = None, image_key: str = "image",
                      value_range: tuple[float, float] = (-1.0, 1.0)) -> list[str]:
  """The eval rows of kind ``'image_prompt'``: ``{image [H, W, C] float32, prompt [P],
  prompt_mask [P]}`` (deterministic)."""
  return image_specs(image_size, image_key, value_range) + [
      f"chat_prompt({int(prompt_len)}, question={_literal(question)})",
      "keep(('image', 'prompt', 'prompt_mask'))"]


def _literal(value: Any) -> str:
  return repr(tuple(value) if isinstance(value, list) else value)


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------


def _length(example: Mapping[str, Any]) -> int:
  return len(example["tokens"])


def pack_row(examples: Sequence[Mapping[str, Any]], seq_len: int, max_images: int, *,
             pad_id: int = 0, image_key: str = "image") -> dict[str, np.ndarray]:
  """Packs 1..``max_images`` encoded examples (``tokens``, ``loss_mask`` [L_j], ``image``
  [H, W, C]) into one row of ``seq_len`` slots (module docstring); ValueError if they do not
  fit."""
  if not 1 <= len(examples) <= max_images:
    raise ValueError(f"a row packs 1..{max_images} examples, got {len(examples)}")
  total = sum(_length(e) for e in examples)
  if total > seq_len:
    raise ValueError(f"examples of {total} tokens do not fit in a row of {seq_len}")
  row = {"tokens": np.full(seq_len, pad_id, np.int32),
         **{k: np.zeros(seq_len, np.int32) for k in ROW_KEYS[1:]}}
  first = np.asarray(examples[0][image_key])
  images = np.zeros((max_images,) + first.shape, first.dtype)
  at = 0
  for j, ex in enumerate(examples):
    n = _length(ex)
    row["tokens"][at:at + n] = ex["tokens"]
    row["loss_mask"][at:at + n] = ex["loss_mask"]
    row["segment_ids"][at:at + n] = j + 1
    row["positions"][at:at + n] = np.arange(n)
    images[j] = ex[image_key]
    at += n
  row["images"] = images
  return row


def _fits(used: int, count: int, length: int, seq_len: int, max_images: int) -> bool:
  """Whether an example of ``length`` tokens joins a row holding ``count`` examples in
  ``used`` slots (the greedy rule of :class:`PackIterDataset` and :func:`padding_stats`)."""
  return count < max_images and used + length <= seq_len


class _PackIterator(grain.DatasetIterator):
  """Greedy packing (see :class:`PackIterDataset`). State: the parent's state before the
  next row's first example (the example held back from the last row is read again)."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, max_images: int,
               pad_id: int, image_key: str):
    super().__init__(parent)
    self._seq_len, self._k = seq_len, max_images
    self._pad_id, self._image_key = pad_id, image_key
    self._held: Any = None  # (parent state before it, example) that did not fit the last row

  def _read(self) -> tuple[Any, Any]:
    state = self._parent.get_state()
    return state, next(self._parent)

  def __next__(self) -> dict[str, np.ndarray]:
    row, used = [], 0
    while len(row) < self._k:
      if self._held is not None:
        (state, ex), self._held = self._held, None
      else:
        try:
          state, ex = self._read()
        except StopIteration:
          if row:
            break
          raise
      n = _length(ex)
      if n > self._seq_len:
        raise ValueError(f"an encoded example of {n} tokens is longer than the packed row "
                         f"({self._seq_len}); encode with max_len <= seq_len")
      if row and not _fits(used, len(row), n, self._seq_len, self._k):
        self._held = (state, ex)
        break
      row.append(ex)
      used += n
    return pack_row(row, self._seq_len, self._k, pad_id=self._pad_id,
                    image_key=self._image_key)

  def get_state(self) -> dict:
    return {"parent": self._held[0] if self._held is not None else self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._held = None


class PackIterDataset(grain.IterDataset):
  """Packs a stream of encoded examples into rows (:func:`pack_row`): greedily in stream
  order, an example opens a new row when the current one has ``max_images`` examples or no
  room for its tokens. Deterministic and checkpointable: resuming from ``get_state`` gives
  exactly the rows an uninterrupted iterator gives."""

  def __init__(self, parent: grain.IterDataset, seq_len: int, max_images: int, *,
               pad_id: int = 0, image_key: str = "image"):
    super().__init__(parent)
    if seq_len <= 0 or max_images <= 0:
      raise ValueError(f"seq_len and max_images must be > 0, got {seq_len}, {max_images}")
    self._args = (seq_len, max_images, pad_id, image_key)

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self._args[0]}, max_images={self._args[1]})"


def train_iterator(source: Any, transform: pipeline.Transform, *, batch_size: int, seed: int,
                   seq_len: int, max_images: int, pad_id: int = 0, num_threads: int = 2,
                   shuffle: bool = True) -> pipeline.DataIterator:
  """The packed train stream: ``pipeline.train_stream`` (host shard, shuffle per epoch,
  ``transform`` -> ``{image, tokens, loss_mask}``), unreadable records dropped, packed
  (:class:`PackIterDataset`), ``batch_size`` rows per host batch:
  ``{images [B, k, H, W, C], tokens, loss_mask, segment_ids, positions [B, T] int32}``.
  Checkpointable (``get_state`` / ``set_state``), as ``pipeline.train_iterator``."""
  ds = pipeline.train_stream(source, transform, seed, shuffle).filter(lambda x: x is not None)
  opts = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8)
  ds = PackIterDataset(ds.to_iter_dataset(opts), seq_len, max_images, pad_id=pad_id)
  return pipeline.DataIterator(ds.batch(batch_size, drop_remainder=True), (source,))


def padding_stats(lengths: Iterable[int], seq_len: int, max_images: int,
                  unpacked_len: int | None = None) -> dict[str, float]:
  """The fraction of token slots that are padding, for encoded example ``lengths``:

  * ``pad_fraction_unpacked``: one example per row of ``unpacked_len`` slots (default: the
    longest example): ``1 - sum(L) / (n * unpacked_len)``;
  * ``pad_fraction_packed``: rows of ``seq_len`` packed greedily as :class:`PackIterDataset`
    packs them: ``1 - sum(L) / (rows * seq_len)``;
  * ``examples_per_row``: ``n / rows`` when packed.
  """
  lengths = [int(n) for n in lengths]
  if not lengths:
    raise ValueError("padding_stats needs at least one length")
  unpacked_len = max(lengths) if unpacked_len is None else unpacked_len
  if max(lengths) > min(seq_len, unpacked_len):
    raise ValueError(f"an example of {max(lengths)} tokens is longer than a row")
  rows, used, count = 1, 0, 0
  for n in lengths:
    if count and not _fits(used, count, n, seq_len, max_images):
      rows, used, count = rows + 1, 0, 0
    used, count = used + n, count + 1
  total = sum(lengths)
  return {"pad_fraction_unpacked": 1.0 - total / (len(lengths) * unpacked_len),
          "pad_fraction_packed": 1.0 - total / (rows * seq_len),
          "examples_per_row": len(lengths) / rows}


def row_pad_fraction(segment_ids: np.ndarray) -> float:
  """The fraction of token slots of packed rows that are padding (``segment_ids == 0``)."""
  return float(np.mean(np.asarray(segment_ids) == 0))
