"""Two-tower image-text contrastive training: SigLIP, CLIP and FFF's multi-positive variant.

* SigLIP (Zhai et al. 2023): ``L = -1/N sum_ij log sigmoid(z_ij (t <x_i, y_j> + b))``.
* CLIP (Radford et al. 2021): symmetric InfoNCE with scale ``t``.
* FFF (Bulat et al., CVPR 2024, "FFF: Fixing Flawed Foundations in contrastive pre-training
  results in very strong Vision-Language models"): the sigmoid loss with a multi-positive
  target ``P``. Batch text augmentation: K captions per image (``input.captions_per_image``),
  all positives of their image (texts carry their image's id, the "owner"), so ``P`` has K ones
  per row. False-negative mining (``loss.mining``): pairs whose image-image, text-text or
  image-text cosine (of the model's own stop-gradient embeddings, or of a frozen teacher's) is
  above a threshold are positives too (``bigvl.losses.mining.mine_positives``)::

      P_ij = [owner(j) == i] or [cos(x_i, x_owner(j)) >= thr_ii]
             or [exists k, owner(k) == i: cos(y_k, y_j) >= thr_tt] or [cos(x_i, y_j) >= thr_it]

``loss.impl``: ``dense`` computes the [N, N K] logits of the (global) batch under jit;
``ring`` runs ``ring_sigmoid_loss`` in ``jax.shard_map`` over the batch axes ``('data',
'fsdp')``: text blocks with their owner ids travel around the devices and no device holds more
than an [n, n K] chunk of logits. Mining always runs on the gathered (global) embeddings, then
hands the ring its rows of the mined mask (``[n, N K]`` bools per device) or, with
``loss.mining.max_per_image``, up to that many mined text ids per image.

Ground truth: with ``input.group_key`` (a feature naming each example's equivalence group, e.g.
``concept`` of ``shapes_captions/equiv``) the batch carries ``group`` and every step logs
``true_extra_per_image`` (same-group pairs besides the owner's, per image) and, with mining
on, the mined pairs' ``mined_precision`` / ``mined_recall`` against it
(``mining.mining_quality``); ``loss.mining.source='groups'`` mines exactly those pairs (the
oracle: what perfect mining would give).

Config read: ``input.{dataset, data_dir, train_split, batch_size, captions_per_image,
max_len, tokenizer, vocab_size, image_size, image_key, text_key, group_key, num_threads}``,
``model.*`` (``bigvl.models.two_tower``), ``loss.{name: sigmoid|softmax, impl: dense|ring}``,
``loss.mining.{source: none|self|teacher|groups, teacher_ckpt, thr_ii, thr_tt, thr_it, start_step,
max_per_image, normalize}`` (see ``docs/fff.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bigvl import checkpoint, parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import captioning, image_text, pipeline, sources
from bigvl.losses import contrastive, mining
from bigvl.tasks import base

MINING_SOURCES = ("none", "self", "teacher", "groups")


def owner_ids(num_images: int, captions_per_image: int) -> jax.Array:
  """[N*K] int32: text j (flattened image-major) belongs to image ``j // K``."""
  return jnp.arange(num_images * captions_per_image, dtype=jnp.int32) // captions_per_image


def _threshold(r: Reader, name: str, default: float) -> float | None:
  """A cosine threshold in [-1, 1]; a missing key is the default. None, or any value above 1
  (no cosine exceeds 1; ml_collections cannot set None from the command line), turns the test
  off."""
  if name in r.keys() and name not in r:  # present and None
    r.mark_read(name)
    return None
  value = r.typed(name, (float, int), default)
  if value < -1.0:
    raise ConfigError(f"{r.path}.{name} is a cosine threshold in [-1, 1] (> 1 or None: off), "
                      f"got {value!r}")
  return None if value > 1.0 else float(value)


# --- the loss variants: one unit each (what it supports + how it runs) -----------------------

LossFn = Callable[..., tuple[jax.Array, jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class LossVariant:
  """A two-tower loss: ``fn(task, zimg [N, E], ztxt [N K, E], t, b, owners [N K], mined
  [N, N K] bool | None, k) -> (loss, b as logged, extra metrics)``.

  ``multi_positive``: takes K captions per image and mined positives (sigmoid losses);
  ``mined_as_ids``: can take mined positives as up to ``max_per_image`` text ids (ring).
  """

  fn: LossFn
  multi_positive: bool
  mined_as_ids: bool = False


def _pos_weight(task: Task, k: int, num_mined: jax.Array) -> jax.Array | None:
  """[N] ``K / (K + mined_i)`` with ``loss.mining.normalize``: every image's positives weigh
  K in all, so images with many mined positives (copies of one scene) do not get more
  gradient than the others; None (every pair weighs 1, as in FFF) otherwise."""
  if not task.normalize:
    return None
  return k / (k + num_mined.astype(jnp.float32))


def _softmax_dense(task, zimg, ztxt, t, b, owners, mined, k):
  """CLIP's symmetric InfoNCE; the bias is unused (logged as 0)."""
  return contrastive.softmax_contrastive_loss(zimg, ztxt, t), jnp.zeros_like(b), {}


def _sigmoid_dense(task, zimg, ztxt, t, b, owners, mined, k):
  """SigLIP over the gathered [N, N K] logits; positives = owners | mined."""
  positives = contrastive.positives_from_owners(jnp.arange(zimg.shape[0]), owners)
  weight = None
  if mined is not None:
    positives = jnp.maximum(positives, mined.astype(positives.dtype))
    weight = _pos_weight(task, k, jnp.sum(mined, axis=1))
  return contrastive.sigmoid_loss(zimg, ztxt, t, b, positives=positives,
                                  pos_weight=weight), b, {}


def _sigmoid_ring(task, zimg, ztxt, t, b, owners, mined, k):
  """``ring_sigmoid_loss`` in ``shard_map`` over the batch axes: text blocks travel around
  the devices; mined positives go as per-image mask rows or up to ``max_per_image`` ids."""
  extra, metrics = {}, {}
  if mined is not None:
    if task.max_per_image:
      ids, dropped = contrastive.positive_ids_from_mask(mined, task.max_per_image)
      extra["extra_pos_txt_ids"] = ids
      metrics["mined_dropped"] = dropped
      num_mined = jnp.sum(ids >= 0, axis=1)  # what did not fit is not a positive
    else:
      extra["positives"] = mined
      num_mined = jnp.sum(mined, axis=1)
    weight = _pos_weight(task, k, num_mined)
    if weight is not None:
      extra["pos_weight"] = weight
  axes = parallel.BATCH_AXES
  rows = P(axes)

  def local(zi, zt, t, b, own, extra):
    return contrastive.ring_sigmoid_loss(zi, zt, t, b, axis_name=axes, txt_owner_ids=own,
                                         **extra)

  fn = jax.shard_map(local, mesh=task.mesh, out_specs=P(),
                     in_specs=(rows, rows, P(), P(), rows, {name: rows for name in extra}))
  return fn(zimg, ztxt, t, b, owners, extra), b, metrics


#: ``(loss.name, loss.impl) -> LossVariant``; a new variant is one function and one entry.
LOSSES: dict[tuple[str, str], LossVariant] = {
    ("softmax", "dense"): LossVariant(_softmax_dense, multi_positive=False),
    ("sigmoid", "dense"): LossVariant(_sigmoid_dense, multi_positive=True),
    ("sigmoid", "ring"): LossVariant(_sigmoid_ring, multi_positive=True, mined_as_ids=True),
}


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
    self.group_key = inp.typed("group_key", str, None)
    self.source, self.info = sources.get_source(
        self.dataset, inp.typed("train_split", str, "train"), self.data_dir)
    self.tokenizer = image_text.dataset_tokenizer(
        inp.typed("tokenizer", str, None), self.source, text_key, self.data_dir, self.dataset,
        positive_int(inp, "vocab_size", 4096))
    self.transform = image_text.ImageTextTransform(
        self.tokenizer, self.max_len, captions_per_image=self.k, image_size=self.image_size,
        image_key=inp.typed("image_key", str, "image"), text_key=text_key,
        group_key=self.group_key, train_specs=inp.typed("transforms", (list, tuple), None),
        where=f"{inp.path}.transforms")

    loss = config.loss
    name = check_choice("config.loss.name", loss.name, sorted({n for n, _ in LOSSES}))
    impl = loss.typed("impl", str, "dense")
    if (name, impl) not in LOSSES:
      raise ConfigError(f"config.loss.impl={impl!r} with loss.name={name!r}: the losses are "
                        f"{', '.join(f'{n}/{i}' for n, i in LOSSES)} (name/impl)")
    self.loss_name, self.impl, self.variant = name, impl, LOSSES[name, impl]
    if not self.variant.multi_positive and self.k != 1:
      raise ConfigError(f"config.loss.name={name!r} has one positive per image: it needs "
                        f"input.captions_per_image=1 (use the sigmoid loss for K > 1)")
    model_mod = registry.load("models", config.model.name, "model")
    self.model = model_mod.from_config(config.model, vocab_size=self.tokenizer.vocab_size,
                                       max_len=self.max_len)
    self._read_mining(loss.get("mining") or Reader({}, "config.loss.mining"))
    if self.mining != "none":
      self.progress_keys = Task.progress_keys + ("mined_per_image",)

  def _read_mining(self, m: Reader) -> None:
    self.mining = check_choice("config.loss.mining.source", m.typed("source", str, "none"),
                               MINING_SOURCES)
    self.thr_ii = _threshold(m, "thr_ii", mining.DEFAULT_THR_II)
    self.thr_tt = _threshold(m, "thr_tt", mining.DEFAULT_THR_TT)
    self.thr_it = _threshold(m, "thr_it", mining.DEFAULT_THR_IT)
    self.start_step = m.typed("start_step", int, 0)
    self.normalize = m.typed("normalize", bool, False)
    if self.start_step < 0:
      raise ConfigError(f"config.loss.mining.start_step must be >= 0, got {self.start_step}")
    self.max_per_image = positive_int(m, "max_per_image", None)
    teacher = m.typed("teacher_ckpt", str, None)
    if self.mining == "none":  # the mining knobs are read (a config may keep them) but idle
      return
    if self.max_per_image and not self.variant.mined_as_ids:
      raise ConfigError(f"config.loss.mining.max_per_image (mined positives as text ids) is "
                        f"for loss.impl='ring'; {self.loss_name}/{self.impl} takes the mask")
    if not self.variant.multi_positive:
      raise ConfigError(f"config.loss.mining needs loss.name='sigmoid' (mined pairs are extra "
                        f"positives, which the {self.loss_name} loss cannot have)")
    if self.mining == "groups" and not self.group_key:
      raise ConfigError("config.loss.mining.source='groups' (oracle mining from ground-truth "
                        "equivalences) needs input.group_key (e.g. 'concept' of "
                        "shapes_captions/equiv)")
    if self.mining != "groups" and (self.thr_ii, self.thr_tt, self.thr_it) == (None,) * 3:
      raise ConfigError("config.loss.mining: every threshold is None, nothing can be mined; "
                        "set loss.mining.source='none' instead")
    self.teacher_dir = None
    if self.mining == "teacher":
      if not teacher:
        raise ConfigError("config.loss.mining.source='teacher' needs loss.mining.teacher_ckpt "
                          "(the workdir of a previous two-tower run)")
      self.teacher_dir = checkpoint.step_dir(teacher, "config.loss.mining.teacher_ckpt")

  # --- the frozen teacher ----------------------------------------------------------------
  def pretrained(self) -> list[checkpoint.WeightSource]:
    """The teacher's params (trainable and frozen alike) from its checkpoint into
    ``state['teacher']``, each array straight into its shards; nothing else is read."""
    if self.mining != "teacher":
      return []
    return [checkpoint.WeightSource(path=self.teacher_dir, dst="extra/teacher", src="params",
                                    what="config.loss.mining.teacher_ckpt")]

  # --- host side -------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.source)

  def train_data(self, seed: int) -> pipeline.DataIterator:
    return pipeline.train_iterator(self.source, self.transform, batch_size=self.host_batch,
                                   seed=seed, num_threads=self.num_threads)

  # --- pure functions --------------------------------------------------------------------
  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    tokens = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
    params = self.model.init(rng, batch["image"], tokens)["params"]
    state = {}
    if self.mining == "teacher":
      # A placeholder with the params' shapes and logical axes (sharded like them); the loop
      # fills it from the checkpoint (``pretrained``). It is checkpointed with the run, so a
      # resumed run does not re-read the teacher.
      state["teacher"] = jax.tree.map(jnp.zeros_like, params)
    return params, state

  # --- evaluation (the declared interface, bigvl/tasks/base.py) ----------------------------
  eval_kinds = ("image_text", "image_label")

  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``embed_images``: ``batch['image'] -> [B, E]``; ``embed_texts``: ``batch['tokens']
    [B, L] -> [B, E]`` (L2-normalised)."""
    return base.embedding_predict_fns(self.model)

  def eval_transform(self, kind: str, num_captions: int = 1, label_key: str | None = None,
                     **opts: Any) -> base.EvalTransform:
    """``'image_text'``: ``{'image', 'tokens': [num_captions, L], 'label'?}``;
    ``'image_label'``: ``{'image', 'label'}`` (``label_key``: default the input's)."""
    if kind == "image_label" and not opts:
      return lambda ex: self.transform.image_label(ex, label_key)
    if kind != "image_text" or opts or label_key is not None:
      return super().eval_transform(kind, **opts)
    return lambda ex: self.transform.eval(ex, num_captions)

  def encode_texts(self, texts) -> dict[str, np.ndarray]:
    return {"tokens": self.tokenizer.encode(list(texts), self.max_len)}

  def decode_texts(self, ids: np.ndarray) -> list[str]:
    return captioning.decode_generated(self.tokenizer, ids)

  def _mine(self, state, batch, images, tokens, zimg, ztxt, owners) -> mining.MiningResult:
    if self.mining == "groups":
      return mining.group_positives(batch["group"], owners)
    if self.mining == "teacher":
      zimg, ztxt, _, _ = self.model.apply({"params": state["teacher"]}, images, tokens)
    return mining.mine_positives(zimg, ztxt, owners, thr_ii=self.thr_ii, thr_tt=self.thr_tt,
                                 thr_it=self.thr_it)

  def loss(self, params, state, batch, rng, step):
    images, tokens = batch["image"], batch["tokens"]
    n, k = tokens.shape[0], tokens.shape[1]
    tokens = tokens.reshape(n * k, -1)
    zimg, ztxt, t, b = self.model.apply({"params": params}, images, tokens)
    owners = owner_ids(n, k)
    metrics = {}
    mined = None
    if self.mining != "none":
      res = self._mine(state, batch, images, tokens, zimg, ztxt, owners)
      on = step >= self.start_step
      mined = (res.positives > 0) & (res.base == 0) & on  # [N, N K] bool, mined pairs only
      num = jnp.where(on, res.num_mined, 0)
      metrics.update(mined_positives=num, mined_per_image=num / n,
                     mined_ii=jnp.where(on, res.num_ii, 0), mined_tt=jnp.where(on, res.num_tt, 0),
                     mined_it=jnp.where(on, res.num_it, 0))
    if "group" in batch:  # ground truth: how right the mining is (also with mining off)
      truth = mining.same_group(batch["group"], owners)
      base = mining.owner_mask(n, owners)[0]
      metrics["true_extra_per_image"] = jnp.sum(truth & ~base) / n
      if mined is not None:
        metrics["mined_precision"], metrics["mined_recall"] = mining.mining_quality(
            mined, truth, base)

    loss, b, extra_metrics = self.variant.fn(self, zimg, ztxt, t, b, owners, mined, k)
    metrics.update(extra_metrics)

    # Mean logits of the N K owner pairs and of all other pairs, in O((N + N K) D): the ring
    # never materialises the [N, N K] logits, and these metrics do not either.
    zi, zt = jax.lax.stop_gradient(zimg), jax.lax.stop_gradient(ztxt)
    m = n * k
    pos_dot = jnp.sum(jnp.repeat(zi, k, axis=0) * zt)
    all_dot = jnp.dot(zi.sum(axis=0), zt.sum(axis=0))
    metrics.update(t=t, b=b, pos_logit=t * pos_dot / m + b,
                   neg_logit=t * (all_dot - pos_dot) / max(n * m - m, 1) + b)
    return loss, (metrics, state)
