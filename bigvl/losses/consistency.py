"""Semi-supervised learning losses and helpers (consistency, entropy, pseudo-labels, mixing).

Pure ``jax.numpy`` functions of arrays and pytrees; no flax. The method families follow
Ouali et al. 2020, "An Overview of Deep Semi-Supervised Learning"; each function names the
paper its formula comes from.

Conventions:

* ``logits``: [B, C] (any leading dims work where noted); probabilities ``p``, ``q``: [B, C],
  rows summing to one. Everything is computed in float32.
* Distance functions (``mse``, ``kl_divergence``, ``entropy``, ``cross_entropy``) return
  **per-example** values of shape ``[B]`` (the class axis, the last, is reduced); the caller
  averages, masks or weights them.
* ``*_loss`` functions return a **scalar**, the mean over the whole batch (masked-out examples
  count as zeros in the mean, as in FixMatch and UDA).
* Targets are not ``stop_gradient``-ed by the distance functions; the ``*_loss`` functions and
  ``vat_perturbation`` stop the gradient through their targets, as the papers do.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = object

_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Distances and per-example terms.
# ---------------------------------------------------------------------------------------------


def _safe_log(x: Array) -> Array:
  """``log x`` for ``x > 0``, 0 elsewhere, with finite gradients (no 0 * inf = NaN)."""
  pos = x > 0
  return jnp.where(pos, jnp.log(jnp.where(pos, x, 1.0)), 0.0)


def _xlogx(x: Array) -> Array:
  """``x log x`` with ``0 log 0 = 0`` and a zero (not NaN) gradient at 0."""
  return x * _safe_log(x)


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-example cross-entropy ``-sum_c y_c log softmax(logits)_c``.

  Args:
    logits: [..., C].
    labels: integer class ids [...] (one fewer dimension than ``logits``), or one-hot / soft
      targets [..., C] (same shape as ``logits``; MixMatch's mixed labels).
  Returns:
    [...] float32.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if labels.ndim == logits.ndim:
    return -jnp.sum(labels.astype(jnp.float32) * logp, axis=-1)
  if labels.ndim != logits.ndim - 1:
    raise ValueError(f"labels {labels.shape} fit neither ids nor targets for logits {logits.shape}")
  return -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mse(p: Array, q: Array) -> Array:
  """Per-example mean squared error over classes, ``1/C sum_c (p_c - q_c)^2``.

  The consistency distance of the Pi-model and Temporal Ensembling (Laine & Aila 2017,
  "Temporal Ensembling for Semi-Supervised Learning", which divide by C), Mean Teacher
  (Tarvainen & Valpola 2017) and MixMatch's unlabeled loss (Berthelot et al. 2019; they
  divide by C as well, via ``L2 / num_classes``). Usually applied to softmax probabilities.
  """
  d = p.astype(jnp.float32) - q.astype(jnp.float32)
  return jnp.mean(jnp.square(d), axis=-1)


def kl_divergence(p_target: Array, q_logits: Array) -> Array:
  """Per-example ``KL(p || q) = sum_c p_c (log p_c - log softmax(q_logits)_c)``.

  ``0 log 0 = 0``, so one-hot targets are fine. The VAT (Miyato et al. 2018) and UDA
  (Xie et al. 2020) consistency distance: ``p_target`` is the (fixed) prediction on the clean /
  weakly augmented input, ``q_logits`` the prediction on the perturbed / strongly augmented one.
  """
  p = p_target.astype(jnp.float32)
  logq = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
  return jnp.sum(_xlogx(p) - p * logq, axis=-1)


def entropy(logits: Array) -> Array:
  """Per-example Shannon entropy of ``softmax(logits)``, ``-sum_c p_c log p_c`` (natural log).

  Entropy Minimization (Grandvalet & Bengio 2005, "Semi-supervised Learning by Entropy
  Minimization") adds ``mean(entropy(logits_u))`` to the loss.
  """
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


# ---------------------------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------------------------


def sigmoid_rampup(step: Array | float, rampup_length: float) -> Array:
  """``exp(-5 (1 - t)^2)``, ``t = clip(step / rampup_length, 0, 1)``: 0.0067 at 0, 1 at the end.

  The unsupervised-weight ramp-up of Laine & Aila 2017 (Pi-model, Temporal Ensembling), reused
  by Mean Teacher. ``rampup_length <= 0`` means no ramp-up (returns 1).
  """
  if rampup_length <= 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_length, 0.0, 1.0)
  return jnp.exp(-5.0 * jnp.square(1.0 - t))


def linear_rampup(step: Array | float, rampup_length: float) -> Array:
  """``clip(step / rampup_length, 0, 1)`` (MixMatch's / ICT's unlabeled-weight ramp-up).

  ``rampup_length <= 0`` means no ramp-up (returns 1).
  """
  if rampup_length <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.clip(jnp.asarray(step, jnp.float32) / rampup_length, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Targets: sharpening, label guessing, ensembles.
# ---------------------------------------------------------------------------------------------


def sharpen(p: Array, temperature: float) -> Array:
  """MixMatch's sharpening (Berthelot et al. 2019): ``p_c^(1/T) / sum_k p_k^(1/T)``.

  Computed as ``softmax(log p / T)`` for numerical safety; ``T -> 0`` tends to one-hot.
  """
  p = p.astype(jnp.float32)
  logp = jnp.where(p > 0, _safe_log(p), -jnp.inf)  # zero stays zero; no NaN gradients
  return jax.nn.softmax(logp / temperature, axis=-1)


def guess_labels(logits_k: Array, temperature: float) -> Array:
  """MixMatch label guessing: ``sharpen(1/K sum_k softmax(logits_k), T)``, stop-gradient.

  Args:
    logits_k: [K, B, C], the predictions on K augmentations of the same unlabeled batch.
  Returns:
    [B, C] sharpened targets.
  """
  mean_p = jnp.mean(jax.nn.softmax(logits_k.astype(jnp.float32), axis=-1), axis=0)
  return jax.lax.stop_gradient(sharpen(mean_p, temperature))


def temporal_ensemble_update(ensemble: Array, probs: Array, alpha: float,
                             num_updates: Array | int) -> tuple[Array, Array]:
  """Temporal Ensembling's accumulator (Laine & Aila 2017, Alg. 2).

  ``Z <- alpha Z + (1 - alpha) z`` and the start-up-bias corrected target
  ``z~ = Z / (1 - alpha^t)``, where ``t`` (``num_updates``) counts the updates of ``Z``
  including this one (``t >= 1``).

  Args:
    ensemble: Z, [..., C] (zeros initially).
    probs: z, the new predictions, same shape.
    alpha: the ensemble momentum (0.6 in the paper).
    num_updates: t >= 1.
  Returns:
    ``(new_ensemble, target)``.
  """
  new = alpha * ensemble + (1.0 - alpha) * probs.astype(jnp.float32)
  t = jnp.asarray(num_updates, jnp.float32)
  return new, new / (1.0 - jnp.power(alpha, t))


def ema_update(teacher: PyTree, student: PyTree, decay: float | Array) -> PyTree:
  """Mean Teacher's weight average (Tarvainen & Valpola 2017): ``t <- decay t + (1-decay) s``.

  Works leaf-wise over any matching pytrees (params, batch statistics); keeps the teacher's
  dtypes.
  """
  return jax.tree_util.tree_map(
      lambda t, s: (decay * t + (1.0 - decay) * s).astype(t.dtype), teacher, student)


# ---------------------------------------------------------------------------------------------
# MixUp (MixMatch flavour).
# ---------------------------------------------------------------------------------------------


def sample_mixup_lambda(rng: Array, alpha: float, shape: tuple[int, ...] = ()) -> Array:
  """``lam ~ Beta(alpha, alpha)``, then MixMatch's ``lam' = max(lam, 1 - lam)`` (so >= 0.5).

  ``shape=()`` gives one lambda for the batch; ``shape=(B,)`` one per example (as in the
  MixMatch reference code).
  """
  lam = jax.random.beta(rng, alpha, alpha, shape, dtype=jnp.float32)
  return jnp.maximum(lam, 1.0 - lam)


def mixup(x1: Array, y1: Array, x2: Array, y2: Array, lam: Array | float) -> tuple[Array, Array]:
  """MixUp (Zhang et al. 2018), as used by MixMatch: ``lam x1 + (1-lam) x2`` and same for y.

  Args:
    x1, x2: [B, ...] inputs; y1, y2: [B, C] one-hot / soft targets.
    lam: scalar, or [B] (one per example; broadcast over the trailing axes).
  Returns:
    ``(x, y)``, in the dtypes of ``x1`` and ``y1``.
  """
  lam = jnp.asarray(lam, jnp.float32)

  def mix(a, b):
    lam_b = lam.reshape(lam.shape + (1,) * (a.ndim - lam.ndim)) if lam.ndim else lam
    return (lam_b * a.astype(jnp.float32) + (1.0 - lam_b) * b.astype(jnp.float32)).astype(a.dtype)

  return mix(x1, x2), mix(y1, y2)


# ---------------------------------------------------------------------------------------------
# Virtual Adversarial Training.
# ---------------------------------------------------------------------------------------------


def _l2_normalize_per_example(d: Array) -> Array:
  # As in the VAT reference code: divide by the max-abs first (avoids under/overflow), then by
  # the L2 norm over all non-batch axes.
  axes = tuple(range(1, d.ndim))
  d = d / (_EPS + jnp.max(jnp.abs(d), axis=axes, keepdims=True))
  return d / jnp.sqrt(1e-6 + jnp.sum(jnp.square(d), axis=axes, keepdims=True))


def vat_perturbation(logits_fn: Callable[[Array], Array], x: Array, rng: Array, *,
                     xi: float = 1e-6, eps: float = 6.0, num_power_iterations: int = 1,
                     logits: Array | None = None) -> Array:
  """VAT's adversarial perturbation ``r_adv`` (Miyato et al. 2018, "Virtual Adversarial
  Training: A Regularization Method for Supervised and Semi-Supervised Learning", Alg. 1).

  ``r_adv = eps * g / ||g||`` approximates ``argmax_{||r|| <= eps} KL(p(.|x) || p(.|x + r))``:
  the dominant eigenvector of the Hessian ``H`` of that KL at ``r = 0``, found by power
  iteration ``d <- normalize(grad_d KL(p(x) || p(x + xi d)))`` (each step ~ ``H d``) from a
  random unit ``d``. Norms are per example over all non-batch axes.

  Args:
    logits_fn: ``x -> logits`` with the model parameters closed over. With batch norm in train
      mode, pass a function whose statistics updates are discarded.
    x: [B, ...] float inputs.
    rng: PRNG key for the random start.
    xi: the finite-difference step (1e-6 in the paper; use ~1e-6..10 depending on input scale).
    eps: the perturbation norm (6.0 on CIFAR-10 inputs after ZCA in the paper).
    num_power_iterations: K (1 suffices in the paper).
    logits: optional precomputed ``logits_fn(x)`` (saves a forward pass).
  Returns:
    ``r_adv`` of the shape and dtype of ``x``, gradient-stopped.
  """
  if logits is None:
    logits = logits_fn(x)
  p = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
  x = jax.lax.stop_gradient(x)

  def kl_at(d):
    return jnp.sum(kl_divergence(p, logits_fn(x + (xi * d).astype(x.dtype))))

  d = _l2_normalize_per_example(jax.random.normal(rng, x.shape, jnp.float32))
  for _ in range(num_power_iterations):
    d = _l2_normalize_per_example(jax.grad(kl_at)(d))
  return jax.lax.stop_gradient((eps * d).astype(x.dtype))


def vat_loss(logits_fn: Callable[[Array], Array], x: Array, rng: Array, *, xi: float = 1e-6,
             eps: float = 6.0, num_power_iterations: int = 1,
             logits: Array | None = None) -> Array:
  """VAT's LDS term: ``mean_b KL(p(.|x_b) || p(.|x_b + r_adv_b))``, target stop-gradient.

  Same arguments as ``vat_perturbation``; gradients flow through ``logits_fn(x + r_adv)`` into
  the closed-over parameters.
  """
  if logits is None:
    logits = logits_fn(x)
  r_adv = vat_perturbation(logits_fn, x, rng, xi=xi, eps=eps,
                           num_power_iterations=num_power_iterations, logits=logits)
  p = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
  return jnp.mean(kl_divergence(p, logits_fn(jax.lax.stop_gradient(x) + r_adv)))


# ---------------------------------------------------------------------------------------------
# Pseudo-labelling family: Pseudo-Label, FixMatch, UDA.
# ---------------------------------------------------------------------------------------------


def fixmatch_mask(probs: Array, threshold: float) -> Array:
  """``1[max_c probs_c >= threshold]`` as float32, shape [...] (FixMatch's confidence mask)."""
  return (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)


def fixmatch_loss(weak_logits: Array, strong_logits: Array, threshold: float = 0.95) -> Array:
  """FixMatch's unlabeled loss (Sohn et al. 2020, Eq. 4).

  ``1/mu_B sum_b 1[max q_b >= tau] H(argmax q_b, softmax(strong_logits_b))`` with
  ``q_b = softmax(weak_logits_b)`` gradient-stopped; the mean runs over the **whole** unlabeled
  batch (masked examples count as zero).

  Args:
    weak_logits: [B, C] predictions on the weakly augmented views (the pseudo-label source).
    strong_logits: [B, C] predictions on the strongly augmented views of the same images.
    threshold: tau (0.95 in the paper).
  """
  q = jax.lax.stop_gradient(jax.nn.softmax(weak_logits.astype(jnp.float32), axis=-1))
  pseudo = jnp.argmax(q, axis=-1)
  return jnp.mean(fixmatch_mask(q, threshold) * cross_entropy(strong_logits, pseudo))


def pseudo_label_loss(logits: Array, threshold: float = 0.0,
                      target_logits: Array | None = None) -> Array:
  """Pseudo-Label (Lee 2013): CE against the model's own hard prediction, stop-gradient.

  ``mean_b 1[max p_b >= threshold] H(argmax p_b, softmax(logits_b))``, ``p = softmax(
  target_logits)`` (``logits`` when ``target_logits`` is None, as in Lee 2013). ``threshold``
  0 keeps every example (the original); Oliver et al. 2018 ("Realistic Evaluation of Deep
  Semi-Supervised Learning Algorithms") use 0.95. The paper's ramped weight ``alpha(t)`` is
  left to the caller.
  """
  src = logits if target_logits is None else target_logits
  p = jax.lax.stop_gradient(jax.nn.softmax(src.astype(jnp.float32), axis=-1))
  return jnp.mean(fixmatch_mask(p, threshold) * cross_entropy(logits, jnp.argmax(p, axis=-1)))


def uda_loss(weak_logits: Array, strong_logits: Array, temperature: float = 0.4,
             threshold: float = 0.8) -> Array:
  """UDA's consistency loss (Xie et al. 2020, "Unsupervised Data Augmentation for Consistency
  Training", Sec. 3.2 "confidence-based masking" and "sharpening predictions").

  ``mean_b 1[max_c softmax(weak_b)_c >= beta] KL(softmax(weak_b / T) || softmax(strong_b))``,
  target stop-gradient; the confidence is read from the un-sharpened weak prediction, and the
  mean runs over the whole batch (as in the UDA code). ``T = 0.4``, ``beta = 0.8`` are the
  paper's CIFAR-10 values; ``T = 1``, ``threshold = 0`` gives plain KL consistency.

  Args:
    weak_logits: [B, C] predictions on the original / weakly augmented images.
    strong_logits: [B, C] predictions on the strongly (RandAugment) augmented images.
  """
  weak = jax.lax.stop_gradient(weak_logits.astype(jnp.float32))
  target = jax.nn.softmax(weak / temperature, axis=-1)
  mask = fixmatch_mask(jax.nn.softmax(weak, axis=-1), threshold)
  return jnp.mean(mask * kl_divergence(target, strong_logits))
