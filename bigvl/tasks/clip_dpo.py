"""CLIP-DPO step 3: Direct Preference Optimization of an LVLM on CLIP-ranked pairs of its own
answers.

Papers: Ouali et al., "CLIP-DPO: Vision-Language Models as a Source of Preference for Fixing
Hallucinations in LVLMs", ECCV 2024; DPO: Rafailov et al., NeurIPS 2023. For an image ``x``, a
question ``q`` and a pair (chosen ``y+``, rejected ``y-``) from ``bigvl.tools.clip_dpo_rank``::

    h = [log pi(y+ | x, q) - log pi_ref(y+ | x, q)] - [log pi(y- | x, q) - log pi_ref(y- | x, q)]
    L = - log sigmoid(beta h)        (dpo.kind: 'sigmoid' | 'ipo' | 'hinge', bigvl.losses.dpo)

with sequence log-probabilities summed over the answer tokens only (and the EOS that ends the
answer; the prompt and image tokens are masked), ``pi`` the policy (LoRA adapters on the SFT
LVLM: ``model.lora``, ``model.trainable='lora_[ab]$'``) and ``pi_ref`` the SFT model, by
``dpo.reference``:

* ``'frozen'``: a second copy of the SFT weights under ``params/ref``, frozen weights in the
  loop's state (no gradient, no optimizer state), read from ``dpo.reference_path`` (a bigvl
  run) straight into its shards (``pretrained()``);
* ``'adapters_off'``: the policy with its LoRA adapters off (``lora_b = 0``): the SFT model
  exactly while only adapters train, with no second copy in memory (what TRL does with PEFT);
* ``'precomputed'``: the ``chosen_ref_logp`` / ``rejected_ref_logp`` of the preference file
  (the candidates tool scores every candidate with the generating model in one pass).

``dpo.sft_weight > 0`` adds ``w * NLL(y+)`` per answer token (keeps the chosen answers likely).
Metrics: ``rewards/chosen`` = mean ``beta (log pi - log pi_ref)(y+)``, ``rewards/rejected``,
``rewards/accuracy`` (chosen reward > rejected), ``rewards/margin``.

The policy's parameters are ``params/policy`` (the LVLM's tree), so ``config.init_from`` reads
the SFT run there (``{path: W_sft, dst: 'params/policy', src: 'params', keep_init:
'lora_[ab]$'}``). Evaluation uses the LVLM task's prediction functions on the policy
(``generate``, ``answer_logprobs``): the hallucination and captioning evaluators apply.

Config read: everything ``lvlm_caption`` reads for the model, tokenizer, images and generation
(``input.{dataset, data_dir, train_split, image_size, template, tokenizer, num_threads,
batch_size}``, ``model.*``, ``generate.*``), plus ``input.preferences`` (a ``preferences.jsonl``
or the rank tool's workdir), ``input.seq_len`` (one answer row: prompt + answer tokens) and
``dpo.{beta (0.1), kind ('sigmoid'), label_smoothing (0), reference ('frozen'),
reference_path, sft_weight (0)}``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import checkpoint
from bigvl.config import ConfigError, Reader, check_choice
from bigvl.data import captioning, pipeline, preferences, transforms
from bigvl.losses import dpo
from bigvl.tasks import lvlm_caption

#: where the reference log-probabilities come from (module docstring).
REFERENCES = ("frozen", "adapters_off", "precomputed")
_LORA_B = re.compile(r"(^|/)lora_b$")


def adapters_off(params: Any) -> Any:
  """``params`` with every LoRA ``lora_b`` set to zero: the base model's function."""
  def zero(path, x):
    return jnp.zeros_like(x) if _LORA_B.search(
        "/".join(str(getattr(k, "key", k)) for k in path)) else x
  return jax.tree_util.tree_map_with_path(zero, params)


class PreferenceSource:
  """Preference pairs as a random-access source: ``{image, question, chosen, rejected,
  ref_logps [2]}`` per pair, the image read from the SFT pool (``image_index``)."""

  def __init__(self, records: list[dict], images: Any):
    self._records, self._images = records, images

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, i: int) -> dict | None:
    r = self._records[i]
    ex = self._images[int(r["image_index"])]
    if ex is None:
      return None
    refs = [r.get("chosen_ref_logp"), r.get("rejected_ref_logp")]
    return {"image": ex["image"], "question": r["question"], "chosen": r["chosen"],
            "rejected": r["rejected"],
            "ref_logps": np.asarray([np.nan if v is None else v for v in refs], np.float32)}


class PairRows:
  """Transform: a pair -> ``{image, tokens [2, L], loss_mask [2, L], ref_logps [2]}`` (row 0
  chosen, row 1 rejected, each ``ChatEncoder.answer_row``)."""

  def __init__(self, chat: captioning.ChatEncoder, seq_len: int, image_size: int | None):
    self.chat, self.seq_len = chat, seq_len
    self.image = transforms.build(captioning.image_specs(image_size))

  def __call__(self, ex: dict, rng: Any) -> dict:
    rows = [self.chat.answer_row(ex[k], ex["question"], self.seq_len)
            for k in ("chosen", "rejected")]
    return {"image": self.image({"image": ex["image"]}, rng)["image"],
            "tokens": np.stack([r["tokens"] for r in rows]),
            "loss_mask": np.stack([r["loss_mask"] for r in rows]),
            "ref_logps": ex["ref_logps"]}


def read_preferences(path: str) -> list[dict]:
  """The pairs of a ``preferences.jsonl`` (or a rank workdir holding one)."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    path = os.path.join(path, "preferences.jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"config.input.preferences: no preference file {path} (run the "
                      f"clip_dpo_rank tool first)")
  records = preferences.read_pairs_jsonl(path)
  if not records:
    raise ConfigError(f"config.input.preferences: {path} holds no pairs")
  for key in ("image_index", "question"):
    if key not in records[0]:
      raise ConfigError(f"config.input.preferences: {path} lacks {key!r} (not written by the "
                        f"clip_dpo_rank tool?)")
  return records


class Task(lvlm_caption.Task):
  progress_keys = ("rewards/accuracy", "rewards/margin")

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    d = config.get("dpo") or Reader({}, "config.dpo")
    self.beta = float(d.typed("beta", (int, float), 0.1))
    if self.beta <= 0:
      raise ConfigError(f"config.dpo.beta must be > 0, got {self.beta}")
    self.kind = check_choice("config.dpo.kind", d.typed("kind", str, "sigmoid"), dpo.KINDS)
    self.label_smoothing = float(d.typed("label_smoothing", (int, float), 0.0))
    if not 0 <= self.label_smoothing < 0.5 or (self.label_smoothing and self.kind != "sigmoid"):
      raise ConfigError(f"config.dpo.label_smoothing={self.label_smoothing}: in [0, 0.5) and "
                        f"only with kind='sigmoid'")
    self.reference = check_choice("config.dpo.reference", d.typed("reference", str, "frozen"),
                                  REFERENCES)
    self.reference_path = d.typed("reference_path", str, None)
    if self.reference == "frozen" and not self.reference_path:
      raise ConfigError("config.dpo.reference='frozen' needs config.dpo.reference_path (the SFT "
                        "run the reference model is read from)")
    if self.reference == "adapters_off" and not self.model.lm.lora.rank:
      raise ConfigError("config.dpo.reference='adapters_off' needs LoRA adapters "
                        "(config.model.lora.rank > 0)")
    self.sft_weight = float(d.typed("sft_weight", (int, float), 0.0))
    prefs = config.input.typed("preferences", str, None)
    if not prefs:
      raise ConfigError("config.input.preferences is not set: the clip_dpo_rank tool's "
                        "preferences.jsonl (or its workdir)")
    self.records = read_preferences(prefs)
    if self.reference == "precomputed" and any(
        r.get("chosen_ref_logp") is None or r.get("rejected_ref_logp") is None
        for r in self.records):
      raise ConfigError("config.dpo.reference='precomputed' needs chosen_ref_logp and "
                        "rejected_ref_logp in every pair of the preference file")
    self.pairs = PreferenceSource(self.records, self.source)
    self.pair_rows = PairRows(self.chat, self.seq_len, self.image_size)
    longest = max(len(self.chat.prompt_ids(r["question"])) for r in self.records)
    if longest >= self.seq_len:
      raise ConfigError(f"config.input.seq_len={self.seq_len} leaves no room for answers after "
                        f"a {longest}-token prompt")

  # --- host side -------------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    return len(self.records)

  def train_data(self, seed: int) -> pipeline.DataIterator:
    return pipeline.train_iterator(self.pairs, self.pair_rows, batch_size=self.host_batch,
                                   seed=seed, num_threads=self.num_threads)

  def pretrained(self) -> list[checkpoint.WeightSource]:
    if self.reference != "frozen":
      return []
    # a bigvl SFT run (its whole model is 'params') or a Hugging Face LLaVA directory
    hf = checkpoint.is_hf_checkpoint(self.reference_path)
    return checkpoint.weight_sources(self.reference_path, "params/ref",
                                     src=None if hf else "params", keep_init=r"lora_[ab]$",
                                     what="config.dpo.reference_path")

  # --- pure functions --------------------------------------------------------------------
  def trainable(self, path: str) -> bool:
    head, _, rest = path.partition("/")
    return head == "policy" and self._trainable.search(rest) is not None

  def lvlm_params(self, params: Any) -> Any:
    return params["policy"]

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    lvlm = self.model.init(rng, batch["tokens"][:1, 0], batch["image"][:1])["params"]
    params = {"policy": lvlm}
    if self.reference == "frozen":
      params["ref"] = lvlm
    return params, {}

  def _logps(self, params: Any, batch: Any, rng: jax.Array | None) -> tuple[jax.Array, ...]:
    """Policy (or reference) log-probabilities ``[B, 2]`` and answer token counts."""
    b, two, length = batch["tokens"].shape
    feats = self.model.apply({"params": params}, batch["image"], method="image_features")
    tokens = batch["tokens"].reshape(b * two, length)
    logits = self.model.apply({"params": params}, tokens,
                              image_features=jnp.repeat(feats, two, axis=0),
                              rngs={"dropout": rng} if rng is not None else None)
    logps, counts = dpo.sequence_logps_and_counts(
        logits, tokens, batch["loss_mask"].reshape(b * two, length))
    return logps.reshape(b, two), counts.reshape(b, two)

  def loss(self, params, state, batch, rng, step):
    policy, counts = self._logps(params["policy"], batch, rng)
    if self.reference == "precomputed":
      ref = batch["ref_logps"]
    else:
      ref_params = params["ref"] if self.reference == "frozen" else adapters_off(
          params["policy"])
      ref = jax.lax.stop_gradient(self._logps(ref_params, batch, None)[0])
    loss, metrics = dpo.dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta,
                                 self.label_smoothing, self.kind)
    metrics["dpo_loss"] = loss
    if self.sft_weight:
      nll = -policy[:, 0].sum() / jnp.maximum(counts[:, 0].sum(), 1.0)
      metrics["sft_nll"] = nll
      loss = loss + self.sft_weight * nll
    return loss, (metrics, state)
