"""Generative (captioning) training of a LLaVA-style LVLM: next-token loss on answer tokens.

For a packed row of tokens ``x`` with loss mask ``m`` (1 on answer/caption tokens and the EOS
ending them; prompt, image and padding tokens 0)::

    L = - sum_t m_{t+1} log p(x_{t+1} | x_{<=t}, images) / sum_t m_{t+1}

averaged over the answer tokens of the global batch (a token mean, as LLaVA). Rows pack
several examples (``input.max_images``; ``bigvl.data.captioning``): attention stays inside an
example's segment and RoPE positions restart, so packing changes nothing but the padding.

The LLaVA stages (Liu et al. 2023) are configs, not code: ``model.trainable`` is a regex over
parameter paths (``re.search``) -- stage 1 ``'^projector/'`` (vision and LM frozen), stage 2
``'^(projector|lm)/'`` or, with ``model.lora.rank > 0``, ``'^projector/|lora_[ab]$'``. Frozen
parts come from ``config.init_from`` (a SigLIP run's image tower, a public LM directory).

Evaluation: ``predict_fns()['generate']`` generates from ``{image, prompt, prompt_mask}``
rows (``eval_transform('image_prompt')``) with :func:`bigvl.generate.generate_ids`;
``decode_texts`` turns the ids back into text (``bigvl.evaluators.captioning`` scores them
against the scene graph). ``predict_fns()['answer_logprobs']`` scores given answers:
``log p(answer | image, question) = sum_t m_{t+1} log p(x_{t+1} | x_{<=t})`` over rows of
kind ``'image_answer'`` (``{image, tokens [L], loss_mask [L]}`` from examples with
``question`` and ``answer`` texts, ``L = generate.answer_len``): yes/no questions, multiple
choice and zero-shot classification through the LVLM (``bigvl.evaluators.hallucination``).

Config read: ``input.{dataset, data_dir, train_split, batch_size, seq_len, max_images,
image_size, template, answer_key, question, tokenizer (a public ``tokenizer.json``; default:
the shapes word tokenizer), num_threads}``, ``model.{vision.*, lm.*, lora.*,
soft_prompt_tokens, feature_layer, feature_select, trainable, dtype}``,
``generate.{max_new_tokens, prompt_len, answer_len}``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import generate, parallel
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import captioning, pipeline, sources, transforms
from bigvl.data.tokenizer import Tokenizer
from bigvl.losses.dpo import sequence_logps
from bigvl.models import dtypes, lvlm
from bigvl.models.llm import REMAT_POLICIES, LLMConfig
from bigvl.models.lora import LoraConfig
from bigvl.models.soft_prompt import SoftPromptSpec
from bigvl.models.vit import ViT
from bigvl.tasks import base

#: config.model.lm keys -> LLMConfig fields (vocab_size comes from the tokenizer).
LM_FIELDS = ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
             "rope_theta", "norm_eps", "qkv_bias", "tie_embeddings", "remat")


def next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of ``tokens[:, 1:]`` given ``logits[:, :-1]`` where
  ``loss_mask[:, 1:]``; metrics: token accuracy and the number of answer tokens."""
  targets, mask = tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  n = jnp.maximum(mask.sum(), 1.0)
  correct = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
  return (nll * mask).sum() / n, {"token_acc": (correct * mask).sum() / n,
                                  "answer_tokens": mask.sum()}


def lm_config(r: Reader, vocab_size: int, lora: LoraConfig,
              soft_prompts: tuple[SoftPromptSpec, ...], dtype: Any) -> LLMConfig:
  """``config.model.lm`` -> :class:`LLMConfig` (unknown keys refused)."""
  fields = {k: r.get(k) for k in LM_FIELDS[1:] if r.get(k) is not None}
  unknown = set(r.keys()) - set(LM_FIELDS)
  if unknown:
    raise ConfigError(f"{r.path} has unknown keys {sorted(unknown)}; known: {LM_FIELDS}")
  if "remat" in fields:
    check_choice(f"{r.path}.remat", fields["remat"], tuple(REMAT_POLICIES))
  try:
    return LLMConfig(vocab_size=vocab_size, lora=lora, soft_prompts=soft_prompts, dtype=dtype,
                     **fields)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{r.path}: {e}") from None


def compile_regex(where: str, pattern: str) -> re.Pattern:
  """``pattern`` compiled, or a ConfigError naming ``where``."""
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ConfigError(f"{where}={pattern!r} is not a regex: {e}") from None


def load_tokenizer(inp: Reader, data_dir: str) -> Tokenizer:
  """``input.tokenizer`` (a public ``tokenizer.json``), else the shapes word tokenizer."""
  path = inp.typed("tokenizer", str, None)
  if path:
    return Tokenizer(path)
  return captioning.shapes_tokenizer(os.path.join(data_dir, "bigvl_tokenizers",
                                                  "shapes_chat.json"))


def build_lvlm(m: Reader, tok: Tokenizer, image_size: int,
               soft_prompts: tuple[SoftPromptSpec, ...] = ()) -> lvlm.LVLM:
  """``config.model`` -> the :class:`~bigvl.models.lvlm.LVLM` (shared by the LVLM tasks).

  Soft-prompt placeholders are ids from ``tok.vocab_size`` on; the embedding table is rounded
  up to shard evenly, or as large as a public LM's (``model.lm.vocab_size``)."""
  vision = m.vision.to_dict()
  unknown = set(vision) - set(ViT.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ConfigError(f"config.model.vision has unknown fields {sorted(unknown)}")
  lora_r = m.get("lora") or Reader({}, "config.model.lora")
  lora = LoraConfig(rank=lora_r.typed("rank", int, 0),
                    alpha=float(lora_r.typed("alpha", (int, float), 16.0)),
                    dropout=float(lora_r.typed("dropout", (int, float), 0.0)),
                    targets=lora_r.typed("targets", str, LoraConfig.targets))
  top = max([tok.vocab_size] + [s.id + 1 for s in soft_prompts])
  vocab = max(-(-top // 64) * 64, m.lm.typed("vocab_size", int, 0))
  return lvlm.LVLM(
      vision=ViT(**vision), lm=lm_config(m.lm, vocab, lora, soft_prompts,
                                         dtypes.from_config(m, jnp.float32)),
      image_token_id=tok.token_id(captioning.IMAGE), image_size=image_size,
      feature_layer=m.typed("feature_layer", int, -2),
      feature_select=check_choice("config.model.feature_select",
                                  m.typed("feature_select", str, "default"),
                                  lvlm.FEATURE_SELECT))


class Task(base.Task):
  progress_keys = ("token_acc",)
  eval_kinds = ("image_prompt", "image_answer")

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    inp, m = config.input, config.model
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.seq_len = positive_int(inp, "seq_len", 128)
    self.max_images = positive_int(inp, "max_images", 4)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.source, self.info = sources.get_source(
        self.dataset, inp.typed("train_split", str, "train"), self.data_dir)
    self.image_size = inp.typed("image_size", int, None) or int(
        self.info.features["image"].shape[0])  # images are resized to the tower's size

    self.tokenizer = tok = load_tokenizer(inp, self.data_dir)
    self.soft_prompt_tokens = m.typed("soft_prompt_tokens", int, 0)
    self.model = build_lvlm(m, tok, self.image_size, (
        SoftPromptSpec(tok.vocab_size, self.soft_prompt_tokens),)
        if self.soft_prompt_tokens else ())
    self.chat = captioning.ChatEncoder(
        tok, inp.typed("template", str, "plain"), self.model.num_image_tokens,
        soft_prompt_id=tok.vocab_size,
        num_soft_prompt_tokens=self.soft_prompt_tokens)
    question = inp.get("question")
    answer_key = inp.get("answer_key") or "caption"
    self.transform = transforms.build(
        captioning.train_specs(max_len=self.seq_len, answer_key=answer_key, question=question,
                               image_size=self.image_size),
        chat=self.chat)
    self.question = question if isinstance(question, str) else None
    self._trainable = compile_regex("config.model.trainable", m.typed("trainable", str, r"."))
    g = config.get("generate") or Reader({}, "config.generate")
    self.max_new_tokens = positive_int(g, "max_new_tokens", 24)
    plen = len(self.chat.prompt_ids(self.question))
    self.prompt_len = positive_int(g, "prompt_len", -(-plen // 16) * 16)
    self.answer_len = positive_int(g, "answer_len", self.prompt_len + self.max_new_tokens)

  # --- host side -------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.source)

  def train_data(self, seed: int) -> pipeline.DataIterator:
    return captioning.train_iterator(
        self.source, self.transform, batch_size=self.host_batch, seed=seed,
        seq_len=self.seq_len, max_images=self.max_images, pad_id=self.tokenizer.pad_id,
        num_threads=self.num_threads)

  # --- pure functions --------------------------------------------------------------------
  def trainable(self, path: str) -> bool:
    return self._trainable.search(path) is not None

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    params = self.model.init(rng, batch["tokens"][:1], batch["images"][:1],
                             segment_ids=batch["segment_ids"][:1],
                             positions=batch["positions"][:1])["params"]
    return params, {}

  def loss(self, params, state, batch, rng, step):
    logits = self.model.apply({"params": params}, batch["tokens"], batch["images"],
                              segment_ids=batch["segment_ids"], positions=batch["positions"],
                              rngs={"dropout": rng})
    loss, metrics = next_token_loss(logits, batch["tokens"], batch["loss_mask"])
    return loss, (metrics, state)

  # --- evaluation (the declared interface, bigvl/tasks/base.py) ----------------------------
  def lvlm_params(self, params: Any) -> Any:
    """The LVLM's parameters within the task's tree (here the whole tree; a DPO task's policy)."""
    return params

  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``generate``: ``{image [B,H,W,C], prompt [B,P], prompt_mask [B,P]}`` -> greedy new
    ids ``[B, generate.max_new_tokens]`` (EOS, then padding). ``answer_logprobs``: ``{image,
    tokens [B,L], loss_mask [B,L]}`` -> ``[B]`` float32, the answers' log-probabilities."""
    def gen(params, state, batch):
      return generate.generate_ids(
          self.model, {"params": self.lvlm_params(params)}, batch["prompt"],
          batch["prompt_mask"].astype(bool), self.max_new_tokens, eos_id=self.tokenizer.eos_id,
          pad_id=self.tokenizer.pad_id, inputs={"images": batch["image"]})

    def answer_logprobs(params, state, batch):
      logits = self.model.apply({"params": self.lvlm_params(params)}, batch["tokens"],
                                batch["image"])
      return sequence_logps(logits, batch["tokens"], batch["loss_mask"])

    return {"generate": gen, "answer_logprobs": answer_logprobs}

  def eval_transform(self, kind: str, question: str | None = None, **opts: Any
                     ) -> base.EvalTransform:
    """``'image_prompt'``: ``{image, prompt [P] (left-padded), prompt_mask [P]}``;
    ``'image_answer'``: examples with ``question`` and ``answer`` texts -> ``{image, tokens
    [L], loss_mask [L]}`` (right-padded, mask on the answer and its EOS)."""
    rng = np.random.default_rng(0)  # eval ops are deterministic
    if kind == "image_answer" and question is None and not opts:
      image = transforms.build(captioning.image_specs(self.image_size))

      def answer_row(ex):
        row = self.chat.answer_row(transforms.texts_of(ex["answer"])[0],
                                   transforms.texts_of(ex["question"])[0], self.answer_len)
        return {"image": image({"image": ex["image"]}, rng)["image"], **row}

      return answer_row
    if kind != "image_prompt" or opts:
      return super().eval_transform(kind, **opts)
    t = transforms.build(captioning.eval_prompt_specs(
        prompt_len=self.prompt_len, question=question or self.question,
        image_size=self.image_size), chat=self.chat)
    return lambda ex: t(ex, rng)

  def decode_texts(self, ids: np.ndarray) -> list[str]:
    return captioning.decode_generated(self.tokenizer, np.asarray(ids))
