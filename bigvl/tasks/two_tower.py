"""Two-tower image-text contrastive training: SigLIP, CLIP and FFF's multi-positive variant.

* SigLIP (Zhai et al. 2023): ``L = -1/N sum_ij log sigmoid(z_ij (t <x_i, y_j> + b))``.
* CLIP (Radford et al. 2021): symmetric InfoNCE with scale ``t``.
* FFF (Bulat et al. 2024): K captions per image (``input.captions_per_image``), each a
  positive of its image, so the [N, N*K] target has K ones per row.

Config read: ``input.{dataset, data_dir, train_split, batch_size, captions_per_image,
max_len, tokenizer, vocab_size, image_size, image_key, text_key, num_threads}``,
``model.*`` (``bigvl.models.two_tower``), ``loss.{name: sigmoid|softmax}``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from bigvl import parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import image_text, pipeline, sources
from bigvl.losses import contrastive
from bigvl.tasks import base


def owner_positives(num_images: int, captions_per_image: int) -> jax.Array:
  """[N, N*K] mask: text j (flattened image-major) is a positive of image ``j // K``."""
  owners = jnp.arange(num_images * captions_per_image) // captions_per_image
  return (jnp.arange(num_images)[:, None] == owners[None, :]).astype(jnp.float32)


class Task(base.Task):
  progress_keys = ("t", "b", "pos_logit", "neg_logit")

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    inp = config.input
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.k = positive_int(inp, "captions_per_image", 1)
    self.max_len = positive_int(inp, "max_len", 16)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.image_size = inp.typed("image_size", int, None)
    text_key = inp.typed("text_key", str, "captions")
    self.source, self.info = sources.get_source(
        self.dataset, inp.typed("train_split", str, "train"), self.data_dir)
    self.tokenizer = image_text.dataset_tokenizer(
        inp.typed("tokenizer", str, None), self.source, text_key, self.data_dir, self.dataset,
        positive_int(inp, "vocab_size", 4096))
    self.transform = image_text.ImageTextTransform(
        self.tokenizer, self.max_len, captions_per_image=self.k, image_size=self.image_size,
        image_key=inp.typed("image_key", str, "image"), text_key=text_key)

    self.loss_name = check_choice("config.loss.name", config.loss.name, ("sigmoid", "softmax"))
    if self.loss_name == "softmax" and self.k != 1:
      raise ConfigError("config.loss.name='softmax' has one positive per image: it needs "
                        "input.captions_per_image=1 (use the sigmoid loss for K > 1)")
    model_mod = registry.load("models", config.model.name, "model")
    self.model = model_mod.from_config(config.model, vocab_size=self.tokenizer.vocab_size,
                                       max_len=self.max_len)

  @property
  def num_train_examples(self) -> int:
    return len(self.source)

  def train_data(self, seed: int) -> pipeline.DataIterator:
    return pipeline.train_iterator(self.source, self.transform, batch_size=self.host_batch,
                                   seed=seed, num_threads=self.num_threads)

  # --- pure functions --------------------------------------------------------------------
  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
    return self.model.init(rng, batch["image"], tokens)["params"], {}

  def embed_images(self, params: Any, images: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, images, method="embed_images")

  def embed_texts(self, params: Any, tokens: jax.Array) -> jax.Array:
    return self.model.apply({"params": params}, tokens, method="embed_texts")

  def loss(self, params, state, batch, rng, step):
    images, tokens = batch["image"], batch["tokens"]
    n, k = tokens.shape[0], tokens.shape[1]
    zimg, ztxt, t, b = self.model.apply({"params": params}, images,
                                        tokens.reshape(n * k, -1))
    positives = owner_positives(n, k)
    if self.loss_name == "sigmoid":
      loss = contrastive.sigmoid_loss(zimg, ztxt, t, b, positives=positives)
    else:
      loss = contrastive.softmax_contrastive_loss(zimg, ztxt, t)
      b = jnp.zeros_like(b)
    logits = contrastive.pairwise_logits(jax.lax.stop_gradient(zimg),
                                         jax.lax.stop_gradient(ztxt), t, b)
    npos = positives.sum()
    metrics = {"t": t, "b": b,
               "pos_logit": (logits * positives).sum() / npos,
               "neg_logit": (logits * (1 - positives)).sum() / (positives.size - npos)}
    return loss, (metrics, state)
