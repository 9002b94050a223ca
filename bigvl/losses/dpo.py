"""Preference-optimisation losses: DPO (sigmoid, with cDPO label smoothing), IPO and hinge.

Pure ``jax.numpy`` functions of arrays; no flax. Everything is computed in float32.

Sequence log-probabilities. For a batch of token sequences ``tokens: [B, T]`` scored by a
causal model's ``logits: [B, T, V]`` (position t predicts token t + 1, as in next-token
prediction), and a 0/1 ``loss_mask: [B, T]`` that is 1 on the answer tokens (0 on the prompt
and padding),

    log pi(y | x) = sum_{t=0}^{T-2} mask[t+1] * log softmax(logits[t])[tokens[t+1]].

``mask[0]`` never counts (nothing predicts the first token).

Preference losses. With the policy's and the frozen reference model's sequence log-probs of the
chosen (``c``) and rejected (``r``) answers,

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)),

the per-example losses are

* ``'sigmoid'``, DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language
  Model is Secretly a Reward Model" (as used by CLIP-DPO, Ouali et al. ECCV 2024), with the
  conservative label smoothing ``eps`` of cDPO (Mitchell 2023, labels flipped with
  probability ``eps``):
  ``l = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``;
* ``'ipo'``, IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
  from Human Preferences": ``l = (h - 1 / (2 beta))^2``;
* ``'hinge'``, SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
  Feedback": ``l = max(0, 1 - beta h)``;

and the loss is their mean over the batch. The implicit rewards reported as metrics are
``r_c = beta (log pi(y_c) - log ref(y_c))`` and ``r_r = beta (log pi(y_r) - log ref(y_r))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

KINDS = ("sigmoid", "ipo", "hinge")


def sequence_logps_and_counts(logits: Array, tokens: Array, loss_mask: Array
                              ) -> tuple[Array, Array]:
  """Masked sum of next-token log-probabilities per sequence, and the number of tokens summed.

  Args:
    logits: [B, T, V] causal-model logits (any float dtype; cast to float32).
    tokens: [B, T] int token ids; position t's logits score ``tokens[:, t + 1]``.
    loss_mask: [B, T] 0/1, 1 on the answer tokens whose log-probability counts; ``[:, 0]`` is
      ignored.
  Returns:
    logps: [B] float32, ``sum_t mask[t+1] log softmax(logits[t])[tokens[t+1]]``, t < T - 1.
    counts: [B] float32, ``sum_{t>=1} mask[t]``, the number of answer tokens in ``logps``
      (e.g. for a length-normalised ``logps / counts``).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)
  token_logps = target_logits[..., 0] - jax.nn.logsumexp(logits, axis=-1)
  # where (not just *): a masked position never leaks a NaN/inf from its (unused) logits.
  logps = jnp.sum(jnp.where(mask > 0, token_logps * mask, 0.0), axis=-1)
  return logps, jnp.sum(mask, axis=-1)


def sequence_logps(logits: Array, tokens: Array, loss_mask: Array) -> Array:
  """[B] float32 masked sequence log-probabilities; see ``sequence_logps_and_counts``."""
  return sequence_logps_and_counts(logits, tokens, loss_mask)[0]


def _check_args(kind: str, label_smoothing: float, beta: Array | float) -> None:
  if kind not in KINDS:
    raise ValueError(f"unknown DPO loss kind {kind!r}; choose one of {KINDS}")
  if label_smoothing != 0.0 and kind != "sigmoid":
    raise ValueError(f"label_smoothing is only defined for kind='sigmoid', got kind={kind!r} "
                     f"with label_smoothing={label_smoothing}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
  if isinstance(beta, int | float) and not beta > 0:
    raise ValueError(f"beta must be > 0, got {beta}")


def dpo_loss(policy_chosen_logps: Array, policy_rejected_logps: Array,
             ref_chosen_logps: Array, ref_rejected_logps: Array, beta: Array | float,
             label_smoothing: float = 0.0, kind: str = "sigmoid"
             ) -> tuple[Array, dict[str, Array]]:
  """DPO / IPO / hinge preference loss (module docstring) and its metrics.

  Args:
    policy_chosen_logps, policy_rejected_logps: [B] sequence log-probs of the chosen and
      rejected answers under the policy (``sequence_logps``).
    ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference model (the
      caller stops their gradient if they come from a model being differentiated).
    beta: the inverse temperature (> 0), scalar.
    label_smoothing: cDPO's ``eps`` in [0, 0.5), the assumed probability that a preference
      label is flipped; only for ``kind='sigmoid'``. A Python float.
    kind: one of ``KINDS``: ``'sigmoid'`` (DPO), ``'ipo'`` or ``'hinge'`` (SLiC). A Python str.
  Returns:
    loss: scalar float32, the mean per-example loss.
    metrics: float32 scalars, means over the batch: ``'rewards/chosen'`` (``r_c``),
      ``'rewards/rejected'`` (``r_r``), ``'rewards/accuracy'`` (fraction with ``r_c > r_r``),
      ``'rewards/margin'`` (``r_c - r_r``), ``'logps/chosen'`` and ``'logps/rejected'`` (the
      policy's log-probs).
  Raises:
    ValueError: for an unknown ``kind``, ``label_smoothing`` out of range or nonzero with a
      kind other than ``'sigmoid'``, or a Python ``beta`` that is not positive.
  """
  _check_args(kind, label_smoothing, beta)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  pi_c, pi_r = f32(policy_chosen_logps), f32(policy_rejected_logps)
  ref_c, ref_r = f32(ref_chosen_logps), f32(ref_rejected_logps)
  beta = f32(beta)
  chosen_ratio = pi_c - ref_c
  rejected_ratio = pi_r - ref_r
  h = chosen_ratio - rejected_ratio
  if kind == "sigmoid":
    eps = label_smoothing
    losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h)
    if eps:
      losses = losses - eps * jax.nn.log_sigmoid(-beta * h)
  elif kind == "ipo":
    losses = jnp.square(h - 1.0 / (2.0 * beta))
  else:  # hinge
    losses = jax.nn.relu(1.0 - beta * h)

  reward_c = jax.lax.stop_gradient(beta * chosen_ratio)
  reward_r = jax.lax.stop_gradient(beta * rejected_ratio)
  metrics = {
      "rewards/chosen": jnp.mean(reward_c),
      "rewards/rejected": jnp.mean(reward_r),
      "rewards/accuracy": jnp.mean((reward_c > reward_r).astype(jnp.float32)),
      "rewards/margin": jnp.mean(reward_c - reward_r),
      "logps/chosen": jnp.mean(jax.lax.stop_gradient(pi_c)),
      "logps/rejected": jnp.mean(jax.lax.stop_gradient(pi_r)),
  }
  return jnp.mean(losses), metrics
