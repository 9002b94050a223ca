"""Discriminative fine-tuning of an LVLM (VladVA: Ouali et al., CVPR 2025, "Discriminative
Fine-tuning of LVLMs").

The generative LVLM becomes an image-text embedding model. An image is read with a summary
prompt, a text likewise, and the final (normed) hidden state of the last token is the
embedding::

    x = h_last(LVLM([BOS] <image>^N  p_img)),   y = h_last(LVLM([BOS] text  p_txt))

with ``p_img`` / ``p_txt`` the summary prompts (``"summarize above image in one word :"``),
as hand-written tokens or as soft prompts started at those tokens' embeddings (one for images,
one for texts; ``bigvl.models.soft_prompt``). The loss on a batch of B images with a short
caption and a long description each::

    L = L_con(x, y) + lambda * L_ntp(description | image)

``L_con``: the symmetric softmax InfoNCE with a learned temperature (the paper's; CLIP's
``softmax`` loss) or SigLIP's sigmoid loss (``loss.name``), the core's loss variants
(``two_tower.LOSSES``: ``loss.impl='ring'`` runs across devices); ``L_ntp``: the next-token
loss on the description's tokens (``lvlm_caption.next_token_loss``), with the image read once
for both. Only the soft prompts, the LoRA adapters (rank 16, alpha 16 on the LM's linear
layers by default) and the temperature train: ``model.trainable``.

Parameters: ``lvlm/...`` (the LVLM: start it from a captioner run with
``init_from.lvlm = {path, dst: 'params/lvlm', src: 'params'}``), ``t``, ``b``.
Prediction functions ``embed_images`` / ``embed_texts`` (L2-normalised) serve the two-tower
evaluators (zero-shot, retrieval, compositionality) unchanged.

Config read: ``input.{dataset, data_dir, train_split, batch_size, max_len, ntp_len, template,
tokenizer, image_size, num_threads}``, ``prompts.{image, text}``, ``model.*`` (as
``lvlm_caption``, plus ``soft_prompts`` on/off, ``temperature_init``, ``bias_init``),
``loss.{name, impl, ntp_weight}``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import captioning, pipeline, sources, transforms
from bigvl.models import logical, lvlm
from bigvl.models.soft_prompt import SoftPromptSpec
from bigvl.models.two_tower import l2_normalize
from bigvl.tasks import base, lvlm_caption, two_tower


def last_token(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """``hidden [B, T, D]`` at each row's last valid position (``mask [B, T]``): right or left
  padding, any lengths."""
  idx = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)
  return jnp.take_along_axis(hidden, jnp.maximum(idx, 0)[:, None, None], axis=1)[:, 0]


def positions_of(mask: jax.Array) -> jax.Array:
  """RoPE positions that count valid tokens only: ``cumsum(mask) - 1`` (padding-invariant)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class DiscLVLM(nn.Module):
  """The LVLM as an embedding model, with CLIP/SigLIP's learned ``t = exp(t')`` and bias."""

  lvlm: lvlm.LVLM
  image_seq: tuple[int, ...]  # [BOS] <image>^N prompt
  pad_id: int
  temperature_init: float = 10.0
  bias_init: float = -10.0

  def setup(self):
    self.head_t = self.param("t", logical.named(
        nn.initializers.constant(np.log(self.temperature_init))), ())
    self.head_b = self.param("b", logical.named(nn.initializers.constant(self.bias_init)), ())

  def embed_texts(self, tokens: jax.Array) -> jax.Array:
    mask = tokens != self.pad_id
    h = self.lvlm(tokens, attention_mask=mask, positions=positions_of(mask),
                  return_hidden=True)
    return l2_normalize(last_token(h, mask).astype(jnp.float32))

  def embed_images(self, images: jax.Array, image_features: jax.Array | None = None
                   ) -> jax.Array:
    ids = jnp.broadcast_to(jnp.asarray(self.image_seq, jnp.int32),
                           (images.shape[0], len(self.image_seq)))
    h = self.lvlm(ids, images, return_hidden=True, image_features=image_features)
    return l2_normalize(h[:, -1].astype(jnp.float32))

  def scale(self) -> tuple[jax.Array, jax.Array]:
    return jnp.exp(self.head_t), self.head_b

  def __call__(self, images: jax.Array, tokens: jax.Array, ntp_tokens: jax.Array):
    """-> (zimg, ztxt, t, b, NTP logits): the image is read once for both losses."""
    feats = self.lvlm.image_features(images)
    zimg = self.embed_images(images, feats)
    logits = self.lvlm(ntp_tokens, image_features=feats,
                       attention_mask=ntp_tokens != self.pad_id)
    return (zimg, self.embed_texts(tokens), *self.scale(), logits)


class Task(base.Task):
  progress_keys = ("contrastive", "ntp", "t")
  eval_kinds = ("image_text",)
  # the two-tower loss variants read these (no mining here)
  normalize = False
  max_per_image = None

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    inp, m, loss = config.input, config.model, config.loss
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.max_len = positive_int(inp, "max_len", 32)
    self.ntp_len = positive_int(inp, "ntp_len", 96)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.source, self.info = sources.get_source(
        self.dataset, inp.typed("train_split", str, "train"), self.data_dir)
    native = self.info.features["image"].shape[0]  # None: the images vary in size
    self.image_size = inp.typed("image_size", int, None) or (int(native) if native else None)
    if self.image_size is None:
      raise ConfigError(f"config.input.image_size must be set: the images of {self.dataset} "
                        "vary in size")
    self._image_ops = transforms.build(captioning.image_specs(
        None if self.image_size == native else self.image_size))
    self.tokenizer = tok = lvlm_caption.load_tokenizer(inp, self.data_dir)
    default = captioning.load_summary_prompts()["default"]
    p = config.get("prompts") or Reader({}, "config.prompts")
    prompt_ids = {}
    for side in ("image", "text"):
      text = p.typed(side, str, default[side])
      prompt_ids[side] = tok.ids([text], bos=False, eos=False)[0]
      if not prompt_ids[side] or tok.unk_id in prompt_ids[side]:  # unk_id None: no [UNK]
        raise ConfigError(f"config.prompts.{side}={text!r}: empty or has words the "
                          f"tokenizer does not know")
    soft = m.typed("soft_prompts", bool, True)
    specs = tuple(SoftPromptSpec(tok.vocab_size + j, len(prompt_ids[s]), tuple(prompt_ids[s]))
                  for j, s in enumerate(("image", "text"))) if soft else ()
    self.suffix = {s: ([tok.vocab_size + j] * len(prompt_ids[s]) if soft else prompt_ids[s])
                   for j, s in enumerate(("image", "text"))}
    model = lvlm_caption.build_lvlm(m, tok, self.image_size, specs)
    image_seq = ([tok.bos_id] + [model.image_token_id] * model.num_image_tokens
                 + self.suffix["image"])
    self.model = DiscLVLM(model, tuple(image_seq), tok.pad_id,
                          float(m.typed("temperature_init", (int, float), 10.0)),
                          float(m.typed("bias_init", (int, float), -10.0)))
    self.chat = captioning.ChatEncoder(tok, inp.typed("template", str, "plain"),
                                       model.num_image_tokens)
    name = check_choice("config.loss.name", loss.typed("name", str, "softmax"),
                        ("softmax", "sigmoid"))
    impl = loss.typed("impl", str, "dense")
    if (name, impl) not in two_tower.LOSSES:
      raise ConfigError(f"config.loss: {name}/{impl} is not a two-tower loss; they are "
                        f"{', '.join(f'{n}/{i}' for n, i in two_tower.LOSSES)}")
    self.variant = two_tower.LOSSES[name, impl]
    self.ntp_weight = float(loss.typed("ntp_weight", (int, float), 1.0))
    pattern = m.typed("trainable", str, r"lora_[ab]$|soft_prompts_|^[tb]$")
    self._trainable = lvlm_caption.compile_regex("config.model.trainable", pattern)

  # --- host side -------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.source)

  def encode_texts(self, texts) -> dict[str, np.ndarray]:
    """``[BOS] text p_txt`` right-padded to ``input.max_len`` (text cut to fit)."""
    tok, room = self.tokenizer, self.max_len - 1 - len(self.suffix["text"])
    out = np.full((len(texts), self.max_len), tok.pad_id, np.int32)
    for i, ids in enumerate(tok.ids(list(texts), bos=False, eos=False)):
      row = [tok.bos_id] + ids[:room] + self.suffix["text"]
      out[i, :len(row)] = row
    return {"tokens": out}

  def image_row(self, example: dict) -> np.ndarray:
    """float32 in [-1, 1], resized to ``input.image_size`` when the dataset's differ."""
    return self._image_ops({"image": example["image"]}, np.random.default_rng(0))["image"]

  def _train_example(self, example: dict, rng: np.random.Generator) -> dict:
    captions = transforms.texts_of(example["captions"])
    ntp = self.chat.encode(transforms.texts_of(example["description"])[0], "description",
                           max_len=self.ntp_len)
    n = len(ntp["tokens"])
    tokens = np.full(self.ntp_len, self.tokenizer.pad_id, np.int32)
    mask = np.zeros(self.ntp_len, np.int32)
    tokens[:n], mask[:n] = ntp["tokens"], ntp["loss_mask"]
    return {"image": self.image_row(example),
            "tokens": self.encode_texts([captions[rng.integers(len(captions))]])["tokens"][0],
            "ntp_tokens": tokens, "ntp_mask": mask}

  def train_data(self, seed: int) -> pipeline.DataIterator:
    return pipeline.train_iterator(self.source, self._train_example,
                                   batch_size=self.host_batch, seed=seed,
                                   num_threads=self.num_threads)

  # --- pure functions --------------------------------------------------------------------
  def trainable(self, path: str) -> bool:
    return self._trainable.search(path) is not None

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    params = self.model.init(rng, batch["image"][:1], batch["tokens"][:1],
                             batch["ntp_tokens"][:1])["params"]
    return params, {}

  def loss(self, params, state, batch, rng, step):
    zimg, ztxt, t, b, logits = self.model.apply(
        {"params": params}, batch["image"], batch["tokens"], batch["ntp_tokens"],
        rngs={"dropout": rng})
    owners = jnp.arange(zimg.shape[0], dtype=jnp.int32)
    con, b, _ = self.variant.fn(self, zimg, ztxt, t, b, owners, None, 1)
    ntp, metrics = lvlm_caption.next_token_loss(logits, batch["ntp_tokens"],
                                                batch["ntp_mask"])
    metrics.update(contrastive=con, ntp=ntp, t=t, b=b)
    return con + self.ntp_weight * ntp, (metrics, state)

  # --- evaluation (the declared interface, bigvl/tasks/base.py) ----------------------------
  def predict_fns(self) -> dict[str, base.PredictFn]:
    return base.embedding_predict_fns(self.model)

  def eval_transform(self, kind: str, num_captions: int = 1, **opts: Any) -> base.EvalTransform:
    """``'image_text'``: ``{'image', 'tokens': [num_captions, L], 'label'?}``."""
    if kind != "image_text" or opts:
      return super().eval_transform(kind, **opts)

    def row(example):
      caps = transforms.texts_of(example["captions"])[:num_captions]
      out = {"image": self.image_row(example), "tokens": self.encode_texts(caps)["tokens"]}
      if "label" in example:
        out["label"] = np.asarray(example["label"], np.int32)
      return out

    return row
