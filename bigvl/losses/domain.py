"""Unsupervised domain adaptation losses and helpers (adversarial, conditional, consistency).

Pure ``jax.numpy`` functions; no flax. The methods:

* DANN: Ganin et al. 2016, "Domain-Adversarial Training of Neural Networks" (JMLR): a domain
  discriminator trained with binary cross-entropy on the features, through a gradient reversal
  layer (``grad_reverse``) whose coefficient follows ``grl_coefficient``.
* CDAN / CDAN+E: Long et al. 2018, "Conditional Adversarial Domain Adaptation" (NeurIPS): the
  discriminator sees the multilinear map ``f (x) g`` of features and predictions
  (``multilinear_map``, or ``randomized_multilinear_map`` when ``C * d`` is large) and, in
  CDAN+E, the examples are weighted by ``1 + exp(-H(g))`` (``entropy_weights``, ``domain_bce``).
* Target Consistency (TC) and Class-Level InVariance (CLIV): Ouali, Bouvier, Tami & Hudelot
  2020, "Target Consistency for Domain Adaptation: when Robustness meets Transferability":
  the target prediction must be invariant to perturbations of the target input
  (``target_consistency``), and the class-conditional feature distributions of the two domains
  must match; CLIV is implemented here as the class-centroid alignment of Xie et al. 2018,
  "Learning Semantic Representations for Unsupervised Domain Adaptation" (MSTN, ICML), with
  target pseudo-labels (``class_centroid_alignment``).

Conventions as in ``bigvl.losses.consistency``: logits [B, C], features [B, d], float32
computation; pseudo-labels and their confidence masks are gradient-stopped; masked-out examples
count as zeros in a mean over the whole batch (FixMatch style).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from bigvl.losses.consistency import cross_entropy, entropy, fixmatch_mask, kl_divergence, mse

Array = jax.Array

KINDS_TC = ("kl", "mse", "ce")


# ---------------------------------------------------------------------------------------------
# Gradient reversal (DANN).
# ---------------------------------------------------------------------------------------------


@jax.custom_vjp
def _grad_reverse(x: Array, lam: Array) -> Array:
  return x


def _grad_reverse_fwd(x: Array, lam: Array) -> tuple[Array, Array]:
  return x, lam


def _grad_reverse_bwd(lam: Array, g: Array) -> tuple[Array, Array]:
  return (-lam * g).astype(g.dtype), jnp.zeros_like(lam)


_grad_reverse.defvjp(_grad_reverse_fwd, _grad_reverse_bwd)


def grad_reverse(x: Array, lam: Array | float) -> Array:
  """DANN's gradient reversal layer R_lam (Ganin et al. 2016, Sec. 4.2, Eq. 13).

  Forward ``R(x) = x``; backward ``dR/dx = -lam I``: the cotangent is multiplied by ``-lam``,
  so the feature extractor below it *maximises* the discriminator loss that is minimised above
  it. ``lam`` may be a Python float or a traced scalar (e.g. ``grl_coefficient(step, ...)``
  under jit); no gradient flows into ``lam`` (its cotangent is zero).
  """
  return _grad_reverse(x, jnp.asarray(lam, jnp.float32))


def grl_coefficient(step: Array | float, total_steps: float, alpha: float = 10.0,
                    high: float = 1.0, low: float = 0.0) -> Array:
  """DANN's reversal-coefficient schedule (Ganin et al. 2016, Sec. 5.2.2).

  ``lam_p = 2 (high - low) / (1 + exp(-alpha p)) - (high - low) + low`` with
  ``p = clip(step / total_steps, 0, 1)`` the training progress: ``low`` at ``p = 0``, rising
  towards ``high`` (``alpha = 10``, ``high = 1``, ``low = 0`` in the paper; the CDAN code uses
  the same form). Traceable in ``step``.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}")
  p = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)
  span = high - low
  return 2.0 * span / (1.0 + jnp.exp(-alpha * p)) - span + low


# ---------------------------------------------------------------------------------------------
# Discriminator loss and CDAN conditioning.
# ---------------------------------------------------------------------------------------------


def domain_bce(logits_src: Array, logits_tgt: Array, w_src: Array | None = None,
               w_tgt: Array | None = None) -> Array:
  """The domain discriminator's binary cross-entropy, source label 1, target label 0.

  Per example ``l_s = -log sigmoid(z_s)`` and ``l_t = -log sigmoid(-z_t) = -log(1 -
  sigmoid(z_t))`` (DANN, Ganin et al. 2016, Eq. 9; CDAN, Long et al. 2018, Eq. 6).

  * Without weights: ``(sum_s l_s + sum_t l_t) / (B_s + B_t)``.
  * With weights (CDAN+E, Eq. 10, normalised as in the official CDAN code): each domain's
    weights are normalised to sum to one within the domain, ``w~ = w / sum(w)``, then
    ``sum(w~ l) / sum(w~)`` over both domains (so each domain carries half the loss). The
    weights are gradient-stopped.

  Args:
    logits_src: [B_s] discriminator logits on source examples.
    logits_tgt: [B_t] discriminator logits on target examples.
    w_src, w_tgt: optional [B_s], [B_t] non-negative weights (e.g. ``entropy_weights``); both
      or neither.
  Returns:
    scalar float32.
  """
  if (w_src is None) != (w_tgt is None):
    raise ValueError("w_src and w_tgt must be given together")
  loss_s = -jax.nn.log_sigmoid(logits_src.astype(jnp.float32))
  loss_t = -jax.nn.log_sigmoid(-logits_tgt.astype(jnp.float32))
  if w_src is None:
    total = jnp.sum(loss_s) + jnp.sum(loss_t)
    return total / (loss_s.size + loss_t.size)
  ws = jax.lax.stop_gradient(w_src.astype(jnp.float32))
  wt = jax.lax.stop_gradient(w_tgt.astype(jnp.float32))
  ws = ws / jnp.sum(ws)
  wt = wt / jnp.sum(wt)
  return (jnp.sum(ws * loss_s) + jnp.sum(wt * loss_t)) / (jnp.sum(ws) + jnp.sum(wt))


def entropy_weights(logits: Array) -> Array:
  """CDAN+E's entropy conditioning ``w = 1 + exp(-H(p))``, ``p = softmax(logits)`` (Long et
  al. 2018, Eq. 10): confident predictions (``H -> 0``) weigh up to 2, uniform ones
  ``1 + 1/C``. Shape [B]; gradient-stopped.
  """
  return jax.lax.stop_gradient(1.0 + jnp.exp(-entropy(logits)))


def multilinear_map(features: Array, probs: Array) -> Array:
  """CDAN's multilinear conditioning ``T(h) = f (x) g`` flattened (Long et al. 2018, Eq. 4).

  ``out[b, c * d + j] = probs[b, c] * features[b, j]``, i.e. the official code's
  ``bmm(g.unsqueeze(2), f.unsqueeze(1)).view(-1, C * d)``. The official code feeds
  ``g = softmax(logits).detach()``; wrap ``probs`` in ``stop_gradient`` to match it.

  Args:
    features: f, [B, d].
    probs: g, [B, C].
  Returns:
    [B, C * d] float32.
  """
  f = features.astype(jnp.float32)
  g = probs.astype(jnp.float32)
  out = g[:, :, None] * f[:, None, :]
  return out.reshape(f.shape[0], g.shape[1] * f.shape[1])


def random_projections(rng: Array, d: int, c: int, out_dim: int) -> tuple[Array, Array]:
  """The fixed random matrices of CDAN's randomized multilinear map: ``R_f`` [d, out_dim] and
  ``R_g`` [C, out_dim] with i.i.d. standard normal entries (Long et al. 2018, Eq. 5; the
  official code draws them once with ``torch.randn`` and keeps them fixed).
  """
  k_f, k_g = jax.random.split(rng)
  return (jax.random.normal(k_f, (d, out_dim), jnp.float32),
          jax.random.normal(k_g, (c, out_dim), jnp.float32))


def randomized_multilinear_map(features: Array, probs: Array, r_f: Array, r_g: Array) -> Array:
  """CDAN's randomized multilinear map ``T_(.)(h) = (R_f f) * (R_g g) / sqrt(out_dim)``.

  (Long et al. 2018, Eq. 5, with the official code's ``1 / out_dim^(1/2)`` scaling.) An
  unbiased estimate of the inner products of ``multilinear_map``, for when ``C * d`` is too
  large (the paper switches at 4096).

  Args:
    features: [B, d]; probs: [B, C]; r_f: [d, out_dim]; r_g: [C, out_dim] (``random_projections``).
  Returns:
    [B, out_dim] float32.
  """
  out_dim = r_f.shape[1]
  if r_g.shape[1] != out_dim:
    raise ValueError(f"r_f {r_f.shape} and r_g {r_g.shape} disagree on out_dim")
  pf = features.astype(jnp.float32) @ r_f.astype(jnp.float32)
  pg = probs.astype(jnp.float32) @ r_g.astype(jnp.float32)
  return pf * pg / math.sqrt(out_dim)


# ---------------------------------------------------------------------------------------------
# Target consistency and class-level invariance.
# ---------------------------------------------------------------------------------------------


def pseudo_labels(logits: Array, threshold: float) -> tuple[Array, Array]:
  """Hard pseudo-labels and their confidence mask, gradient-stopped.

  ``labels = argmax_c p_c`` (int32 [B]) and ``mask = 1[max_c p_c >= threshold]`` (float32
  [B]), ``p = softmax(logits)``; ``threshold = 0`` keeps everything.
  """
  p = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
  return jnp.argmax(p, axis=-1).astype(jnp.int32), fixmatch_mask(p, threshold)


def target_consistency(logits_clean: Array, logits_perturbed: Array, kind: str = "kl",
                       threshold: float = 0.0) -> tuple[Array, Array]:
  """Target Consistency (TC; Ouali, Bouvier, Tami & Hudelot 2020): the prediction on a target
  example must not change when the input is perturbed (augmented / mixed).

  ``loss = 1/B sum_b m_b D(p_b, q_b)`` with ``p = stop_grad(softmax(logits_clean))``, ``q``
  the prediction on the perturbed input, ``m_b = 1[max_c p_bc >= threshold]`` and

  * ``'kl'``: ``KL(p || q)`` (``consistency.kl_divergence``);
  * ``'mse'``: ``1/C sum_c (p_c - softmax(logits_perturbed)_c)^2`` (``consistency.mse``);
  * ``'ce'``: ``-log q_{argmax p}``, cross-entropy to the clean pseudo-label (FixMatch style).
    Unlike the other two it is not zero at ``q = p`` unless ``p`` is one-hot: it also pushes
    the perturbed prediction towards confidence.

  The sum is divided by the **whole** batch size ``B``, not by ``sum(m)`` (FixMatch / UDA
  normalisation: masked-out examples count as zeros, so the loss shrinks as fewer pass the
  threshold). No gradient flows into ``logits_clean``.

  Args:
    logits_clean: [B, C] predictions on the clean target inputs.
    logits_perturbed: [B, C] predictions on the perturbed target inputs.
    kind: one of ``KINDS_TC``.
    threshold: confidence threshold on the clean prediction (0 keeps every example).
  Returns:
    ``(loss, mask_fraction)``: scalars, ``mask_fraction = mean(m)``.
  """
  if kind not in KINDS_TC:
    raise ValueError(f"unknown target-consistency kind {kind!r}; expected one of {KINDS_TC}")
  p = jax.lax.stop_gradient(jax.nn.softmax(logits_clean.astype(jnp.float32), axis=-1))
  mask = fixmatch_mask(p, threshold)
  if kind == "kl":
    d = kl_divergence(p, logits_perturbed)
  elif kind == "mse":
    d = mse(p, jax.nn.softmax(logits_perturbed.astype(jnp.float32), axis=-1))
  else:
    d = cross_entropy(logits_perturbed, jnp.argmax(p, axis=-1))
  return jnp.sum(mask * d) / d.shape[0], jnp.mean(mask)


def class_centroid_alignment(feat_src: Array, labels_src: Array, feat_tgt: Array,
                             logits_tgt: Array, num_classes: int,
                             threshold: float = 0.0) -> tuple[Array, dict[str, Array]]:
  """Class-Level InVariance (CLIV; Ouali et al. 2020) as class-centroid matching, the semantic
  alignment of MSTN (Xie et al. 2018, Eq. 5) with target pseudo-labels.

  ``c_s^k = mean{f_s : y_s = k}``, ``c_t^k = mean{f_t : argmax p_t = k, max p_t >= threshold}``,
  ``p_t = softmax(logits_tgt)``, and ``loss = 1/|K| sum_{k in K} ||c_s^k - c_t^k||^2`` (squared
  Euclidean) over the set ``K`` of classes present in **both** domains (0 when ``K`` is empty).
  Per-batch centroids (MSTN keeps moving averages across batches; do that outside if wanted).
  Gradients flow into both feature sets, not through the pseudo-labels. One-hot matrix
  products, no boolean indexing: jit-friendly. Source labels outside ``[0, num_classes)`` (e.g.
  -1) are ignored.

  Args:
    feat_src: [B_s, d]; labels_src: int [B_s]; feat_tgt: [B_t, d]; logits_tgt: [B_t, C].
    num_classes: C.
    threshold: confidence threshold on the target predictions.
  Returns:
    ``(loss, {'cliv_mask': fraction of target examples used, 'cliv_classes': |K|})``.
  """
  fs = feat_src.astype(jnp.float32)
  ft = feat_tgt.astype(jnp.float32)
  ys = jax.nn.one_hot(labels_src, num_classes, dtype=jnp.float32)  # [B_s, C]
  yt_labels, mask_t = pseudo_labels(logits_tgt, threshold)
  yt = jax.nn.one_hot(yt_labels, num_classes, dtype=jnp.float32) * mask_t[:, None]  # [B_t, C]
  count_s = jnp.sum(ys, axis=0)
  count_t = jnp.sum(yt, axis=0)
  cent_s = (ys.T @ fs) / jnp.maximum(count_s, 1.0)[:, None]  # [C, d]
  cent_t = (yt.T @ ft) / jnp.maximum(count_t, 1.0)[:, None]
  present = ((count_s > 0) & (count_t > 0)).astype(jnp.float32)
  num_present = jnp.sum(present)
  dist = jnp.sum(jnp.square(cent_s - cent_t), axis=-1)  # [C]
  loss = jnp.sum(present * dist) / jnp.maximum(num_present, 1.0)
  return loss, {"cliv_mask": jnp.mean(mask_t), "cliv_classes": num_present.astype(jnp.int32)}
