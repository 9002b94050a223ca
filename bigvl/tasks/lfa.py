"""LFA: black-box few-shot adaptation of a vision-language model on precomputed features.

Ouali, Bulat, Martinez, Tzimiropoulos, "Black Box Few-Shot Adaptation for Vision-Language
models", ICCV 2023 (arXiv:2304.01752). Official code: ``github.com/saic-fi/LFA``
(``feature_alignment.py``, ``alignment_utils.py``); the defaults below are its ``argparse``
defaults and function defaults, named next to each ``LFAConfig`` field.

Pure functions of numpy / jax arrays (optax for the optimiser); no flax, no train loop. Every
function L2-normalises its feature inputs itself (image features ``x`` and class embeddings /
targets ``t`` row-wise), so raw encoder outputs can be passed.

The method. Image features ``x_n`` (``[N, D]``), labels ``y_n``, class prototypes ``t_c``
(``[C, D]``, text embeddings of the class names); one linear map ``W`` (``[D, D]``) is learned
and a test image is classified by ``argmax_c <xW / |xW|, t_c>`` (``predict``).

1. Orthogonal Procrustes (``procrustes``): ``W_p = argmin_{W^T W = I} |X W - T|_F = U V^T``
   with ``U S V^T = svd(X^T T)``, ``T = [t_{y_n}]_n``.
2. beta-Procrustes (``blend``): ``W_beta = W_p - beta (W_p - I) = (1 - beta) W_p + beta I``,
   not re-orthogonalised (official ``procrustes_align``); ``beta = 0`` is pure Procrustes,
   ``beta = 1`` the identity (zero-shot). beta is chosen by cross-validation
   (``choose_beta``, official ``cross_validation_beta_procrustes``): for each of 25 values in
   ``linspace(0, 1, 25)``, the mean top-1 accuracy over 3 random 80/20 splits of the shots of
   ``W_beta`` fitted on the 80 % and evaluated on the 20 %; the first best beta wins.
3. Refinement (``refine``, official ``mapping_refinement``): from ``W_beta``, minimise the
   adaptive re-ranking loss (``bigvl.losses.rerank``; the k = 3 prototypes nearest to
   ``z_n`` among all classes, the true one contributing 0 when among them; s = 4)
   ``L(W) = mean_{n, j in kNN} max(0, |z_n - t_y| + (1 - <t_j, t_y>) / s - |z_n - t_j|)``,
   ``z_n = x_n W / |x_n W|``, by AdamW (lr 5e-4, betas (0.9, 0.999), eps 1e-8, decoupled
   weight decay 5e-4) with a cosine schedule to 1e-7 over 200 iterations. Each iteration
   draws a random 75 % of the shots (official: ``batch_size=None`` without five-crop ->
   ``int(0.75 N)``), then with probability 0.5 adds Gaussian noise (sigma 0.035) to the
   (unit) features and, independently with probability 0.5, applies dropout (p 0.05, kept
   entries scaled by ``1 / (1 - p)``, as ``torch.nn.functional.dropout``).

U-LFA (``fit_unsupervised``, official ``iterative_unsupervised_refinement``), no labels:
pseudo-labels are the argmax of Sinkhorn soft assignments between the image features and the
class prototypes (entropic OT, uniform marginals ``1/N`` and ``1/C``, squared Euclidean cost;
the official GeomLoss call ``blur=0.05, p=2`` means cost ``|x - t|^2 / 2`` and
``epsilon = blur^2``, i.e. ``epsilon = 2 blur^2 = 0.005`` for the cost ``|x - t|^2`` used here;
soft assignment = transport plan with rows renormalised to sum to 1; solved with ``ott`` and
GeomLoss's epsilon annealing, but run to convergence). Then ``W`` = beta-Procrustes (beta
cross-validated on the pseudo-labels), followed by 5 rounds of: Sinkhorn pseudo-labels
of the *mapped* features ``xW / |xW|``, then refinement (200 iterations, full batch) starting
from the current ``W``. As in the official code, Procrustes is solved once (before the
rounds), not in every round.

Aligning two uni-modal models (paper and official ``gaussian_projection``): image features
of a self-supervised vision model are mapped onto the text embeddings of a separate language
model. If the two dimensions differ the larger side is first reduced to the smaller by a
Gaussian random projection (``gaussian_projection``), then LFA runs unchanged. ``procrustes``
takes any per-sample targets (``[N, D']``, ``D'`` may differ from ``D``: ``W`` is then the
semi-orthogonal ``[D, D']`` polar factor), as the official ``procrustes_align`` does; the
re-ranking refinement needs class prototypes and labels (for paired data, pass the targets as
``class_emb`` and ``labels = arange(N)``).

Not reproduced (all off in the official defaults or outside precomputed single-view
features): five-crop training features, feature interpolation, the spectral / orthogonality
projections after each step, the EMA map used only for base-to-new "two mappings", and the CSLS
/ contrastive / triplet refinement losses.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigvl.losses.rerank import rerank_loss


@dataclasses.dataclass(frozen=True)
class LFAConfig:
  """Every knob of LFA / U-LFA, with the official defaults (``feature_alignment.py``).

  Refinement (``mapping_refinement``):
    n_iters: optimisation steps per refinement (``--n-iters`` 200; the README tunes it per
      dataset, e.g. 100 for EuroSAT / Food101, 1000 for DTD / Aircraft).
    learning_rate: AdamW peak learning rate (``--learning-rate`` 5e-4).
    end_learning_rate: cosine schedule's final value (``--cosine-end-lr`` 1e-7;
      ``CosineAnnealingLR(T_max=n_iters, eta_min)``).
    weight_decay: AdamW decoupled weight decay (``--weight-decay`` 5e-4).
    adam_b1, adam_b2, adam_eps: AdamW moments (torch defaults as passed: 0.9, 0.999, 1e-8).
    knn: nearest prototypes per anchor in the re-ranking loss (``--knn`` 3).
    scale: margin scale s of the re-ranking loss (``--arerank-scale`` 4.0).
    batch_frac: fraction of the shots drawn (without replacement) per step (0.75: official
      ``batch_size = int(0.75 N)`` when ``--batch-size`` is unset and no five-crop).
    unsup_batch_frac: the same for U-LFA's refinements (1.0: ``batch_size=len(features)``).
    max_batch: a cap on those per-step batches (0: none, the official behaviour). Many
      shots (10,000 features: 7,500 per step) make each step a large matmul; a cap of
      1,024 makes a 10k-feature fit several times faster (``bench/lfa_speed.py``).
    noise_std: std of the Gaussian feature noise (``--gaussian-noise`` 0.035).
    dropout: feature dropout rate (``--dropout`` 0.05).
    aug_prob: probability of applying each of noise / dropout per step (0.5:
      ``np.random.uniform() > 0.5``).
  beta-Procrustes (``cross_validation_beta_procrustes``):
    beta: fixed beta (``--beta-procrustes``); None (default) cross-validates it.
    n_betas: number of candidates ``linspace(0, 1, n_betas)`` (``num_of_tries`` 25).
    cv_splits: random splits averaged per beta (``num_samples`` 3).
    cv_frac: training fraction of each split (0.8).
  U-LFA (``iterative_unsupervised_refinement``, ``sinkhorn_assignment``):
    unsup_rounds: pseudo-label + refinement rounds (``--n-unsup-iters`` 5).
    sinkhorn_blur: GeomLoss ``blur`` (0.05); entropic ``epsilon = 2 blur^2`` on ``|x - t|^2``.
    pseudo_label_threshold: keep samples whose max soft assignment exceeds it (``th`` 0.0:
      all).
    sinkhorn_threshold, sinkhorn_max_iterations: ott's stopping rule (marginal error, L1) and
      cap; ours (GeomLoss runs a fixed epsilon-scaling schedule instead).
  seed: seeds the CV splits, the per-step batches and the augmentation.
  """

  n_iters: int = 200
  learning_rate: float = 5e-4
  end_learning_rate: float = 1e-7
  weight_decay: float = 5e-4
  adam_b1: float = 0.9
  adam_b2: float = 0.999
  adam_eps: float = 1e-8
  knn: int = 3
  scale: float = 4.0
  batch_frac: float = 0.75
  unsup_batch_frac: float = 1.0
  max_batch: int = 0
  noise_std: float = 0.035
  dropout: float = 0.05
  aug_prob: float = 0.5
  beta: float | None = None
  n_betas: int = 25
  cv_splits: int = 3
  cv_frac: float = 0.8
  unsup_rounds: int = 5
  sinkhorn_blur: float = 0.05
  pseudo_label_threshold: float = 0.0
  sinkhorn_threshold: float = 1e-4
  sinkhorn_max_iterations: int = 10000
  seed: int = 0


DEFAULT_CONFIG = LFAConfig()


# --- Closed form: Procrustes, beta blending, beta cross-validation. -----------------------------


def normalize(x: np.ndarray) -> np.ndarray:
  """Row-wise L2 normalisation in float32 (numpy; zero rows stay zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def procrustes(x: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Orthogonal Procrustes ``argmin_{W^T W = I} |X W - T|_F = U V^T``, ``U S V^T = svd(X^T T)``.

  Args:
    x: [N, D] source features (L2-normalised here).
    targets: [N, D'] per-sample targets (class prototypes of the labels, another model's
      features of the same samples, ...; L2-normalised here).
  Returns:
    W: [D, D'] float32, orthogonal when ``D == D'`` (semi-orthogonal otherwise). Computed in
    float64.
  """
  x, targets = normalize(x), normalize(targets)
  if x.ndim != 2 or targets.shape[0] != x.shape[0]:
    raise ValueError(f"procrustes needs [N, D] and [N, D'], got {x.shape} and {targets.shape}")
  u, _, vt = np.linalg.svd(x.astype(np.float64).T @ targets.astype(np.float64),
                           full_matrices=False)
  return (u @ vt).astype(np.float32)


def blend(w: np.ndarray, beta: float) -> np.ndarray:
  """beta-Procrustes ``W - beta (W - I) = (1 - beta) W + beta I`` (official ``procrustes_align``;
  not re-orthogonalised). ``beta = 0``: ``W``; ``beta = 1``: the identity."""
  w = np.asarray(w, np.float32)
  if w.ndim != 2 or w.shape[0] != w.shape[1]:
    raise ValueError(f"blend needs a square map, got {w.shape} (project features first)")
  return (1.0 - beta) * w + beta * np.eye(w.shape[0], dtype=np.float32)


def cv_splits(n: int, splits: int = 3, frac: float = 0.8, seed: int = 0):
  """``splits`` random ``(train, held-out)`` index pairs of ``n`` samples: each a fresh
  permutation (``np.random.default_rng(seed)``), its first ``min(int(frac n), n - 1)`` the
  training part (official: 80/20 splits of the shots). Shared by :func:`choose_beta` and the
  linear-probe baseline's choice of ``C`` (``bigvl.lfa.linear_probe``)."""
  n_train = min(int(n * frac), n - 1)
  if n_train < 1:
    raise ValueError(f"a cross-validation split needs at least 2 samples, got {n}")
  rng = np.random.default_rng(seed)
  for _ in range(splits):
    perm = rng.permutation(n)
    yield perm[:n_train], perm[n_train:]


def choose_beta(x: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                betas: np.ndarray | None = None, splits: int = 3, frac: float = 0.8,
                seed: int = 0) -> float:
  """beta of beta-Procrustes by cross-validated top-1 accuracy (official
  ``cross_validation_beta_procrustes``).

  For each of ``splits`` random permutations of the samples, Procrustes is fitted on the first
  ``int(frac N)`` and every ``blend(W, beta)`` is scored on the rest by
  ``argmax_c <x W_beta, t_c>``; the beta with the best mean accuracy wins, the smallest one on
  a tie (official: strict ``>`` while scanning betas upwards). Deviation: the official code
  draws fresh splits for every beta (75 Procrustes fits); here the same ``splits`` splits score
  every beta (3 fits, and the betas are compared on the same data).

  Args:
    x: [N, D] features; labels: [N] int; class_emb: [C, D] (all L2-normalised here).
    betas: candidates, default ``linspace(0, 1, 25)``.
    splits, frac, seed: number of random splits, training fraction, numpy seed.
  Returns:
    the chosen beta (a Python float).
  """
  betas = np.linspace(0.0, 1.0, 25) if betas is None else np.asarray(betas, np.float64)
  x, t = normalize(x), normalize(class_emb)
  labels = np.asarray(labels)
  scores = np.zeros(len(betas))
  for tr, te in cv_splits(x.shape[0], splits, frac, seed):
    w = procrustes(x[tr], t[labels[tr]])
    # x W_beta = (1 - beta) x W + beta x; the row norm does not change the argmax over classes.
    mapped, plain = (x[te] @ w) @ t.T, x[te] @ t.T
    for i, beta in enumerate(betas):
      pred = np.argmax((1.0 - beta) * mapped + beta * plain, axis=1)
      scores[i] += np.mean(pred == labels[te]) / splits
  return float(betas[int(np.argmax(scores))])


# --- Refinement with the re-ranking loss. -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Opt:
  """The static part of one compiled refinement loop."""

  n_iters: int
  batch: int
  learning_rate: float
  end_learning_rate: float
  weight_decay: float
  b1: float
  b2: float
  eps: float
  knn: int
  scale: float
  noise_std: float
  dropout: float
  aug_prob: float


def make_optimizer(config: LFAConfig) -> optax.GradientTransformation:
  """AdamW with ``CosineAnnealingLR(T_max=n_iters, eta_min=end_learning_rate)``: the learning
  rate at step i is ``end + (lr - end) (1 + cos(pi i / n_iters)) / 2``."""
  return _optimizer(_opt(config, 1))


def _opt(config: LFAConfig, batch: int) -> _Opt:
  c = config
  return _Opt(c.n_iters, batch, c.learning_rate, c.end_learning_rate, c.weight_decay, c.adam_b1,
              c.adam_b2, c.adam_eps, c.knn, c.scale, c.noise_std, c.dropout, c.aug_prob)


def _optimizer(o: _Opt) -> optax.GradientTransformation:
  schedule = optax.cosine_decay_schedule(o.learning_rate, max(o.n_iters, 1),
                                         alpha=o.end_learning_rate / o.learning_rate)
  return optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)


def augment(key: jax.Array, x: jax.Array, noise_std: float, dropout: float,
            prob: float = 0.5) -> jax.Array:
  """The official feature augmentation: with probability ``prob`` add ``N(0, noise_std^2)``
  noise, then, independently with probability ``prob``, inverted dropout at rate ``dropout``
  (kept entries scaled by ``1 / (1 - dropout)``). Each branch is a ``lax.cond``, so its random
  numbers are only drawn when it applies."""
  k_on1, k_noise, k_on2, k_drop = jax.random.split(key, 4)
  if noise_std > 0:
    x = jax.lax.cond(jax.random.uniform(k_on1) < prob,
                     lambda v: v + noise_std * jax.random.normal(k_noise, v.shape, v.dtype),
                     lambda v: v, x)
  if dropout > 0:
    x = jax.lax.cond(jax.random.uniform(k_on2) < prob,
                     lambda v: jnp.where(jax.random.bernoulli(k_drop, 1.0 - dropout, v.shape),
                                         v / (1.0 - dropout), 0.0),
                     lambda v: v, x)
  return x


@functools.partial(jax.jit, static_argnames=("o",))
def _refine_loop(w0: jax.Array, x: jax.Array, labels: jax.Array, t: jax.Array, key: jax.Array,
                 o: _Opt) -> tuple[jax.Array, jax.Array]:
  """``o.n_iters`` AdamW steps on the re-ranking loss in one ``lax.scan``: (W, losses)."""
  opt = _optimizer(o)
  n = x.shape[0]

  def loss_fn(w, xb, yb):
    return rerank_loss(xb @ w, yb, t, o.knn, o.scale)

  def step(carry, i):
    w, opt_state = carry
    k_batch, k_aug = jax.random.split(jax.random.fold_in(key, i))
    if o.batch < n:
      idx = jax.random.permutation(k_batch, n)[:o.batch]
      xb, yb = x[idx], labels[idx]
    else:
      xb, yb = x, labels
    xb = augment(k_aug, xb, o.noise_std, o.dropout, o.aug_prob)
    loss, grad = jax.value_and_grad(loss_fn)(w, xb, yb)
    updates, opt_state = opt.update(grad, opt_state, w)
    return (optax.apply_updates(w, updates), opt_state), loss

  (w, _), losses = jax.lax.scan(step, (w0, opt.init(w0)), jnp.arange(o.n_iters))
  return w, losses


def refine(w0: np.ndarray, x: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
           config: LFAConfig = DEFAULT_CONFIG, seed: int | None = None,
           batch_frac: float | None = None, return_losses: bool = False
           ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Refine a map ``W`` by AdamW on the adaptive re-ranking loss (official
  ``mapping_refinement``; module docstring, step 3). One jitted ``lax.scan`` over
  ``config.n_iters`` steps; a step draws ``int(batch_frac N)`` samples without replacement and
  augments them (noise / dropout, rng from ``seed``, default ``config.seed``).

  Args:
    w0: [D, D'] initial map. x: [N, D] features; labels: [N] int; class_emb: [C, D'] (both
      L2-normalised here).
    batch_frac: default ``config.batch_frac`` (0.75).
    return_losses: also return the [n_iters] per-step (augmented mini-batch) losses.
  Returns:
    W: [D, D'] float32 (and the losses).
  """
  x, t = normalize(x), normalize(class_emb)
  frac = config.batch_frac if batch_frac is None else batch_frac
  batch = max(1, min(x.shape[0], int(x.shape[0] * frac)))
  if config.max_batch:
    batch = min(batch, config.max_batch)
  key = jax.random.PRNGKey(config.seed if seed is None else seed)
  w, losses = _refine_loop(jnp.asarray(w0, jnp.float32), jnp.asarray(x),
                           jnp.asarray(labels, jnp.int32), jnp.asarray(t), key,
                           _opt(config, batch))
  w = np.asarray(w)
  return (w, np.asarray(losses)) if return_losses else w


def objective(w: np.ndarray, x: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
              config: LFAConfig = DEFAULT_CONFIG) -> float:
  """The re-ranking loss of the map ``w`` on all of ``(x, labels)``, without augmentation."""
  x = normalize(x)
  return float(rerank_loss(jnp.asarray(x) @ jnp.asarray(w, jnp.float32),
                           jnp.asarray(labels, jnp.int32), jnp.asarray(normalize(class_emb)),
                           config.knn, config.scale))


# --- Prediction. ------------------------------------------------------------------------------


def predict(x: np.ndarray, w: np.ndarray | None, class_emb: np.ndarray) -> np.ndarray:
  """[N, C] cosine logits ``<xW / |xW|, t_c / |t_c|>`` (``x`` L2-normalised first;
  ``w=None``: the identity, i.e. zero-shot)."""
  z = normalize(x)
  if w is not None:
    z = normalize(z @ np.asarray(w, np.float32))
  return z @ normalize(class_emb).T


def accuracy(x: np.ndarray, labels: np.ndarray, w: np.ndarray | None,
             class_emb: np.ndarray) -> float:
  """Top-1 accuracy in [0, 1] of ``predict(x, w, class_emb)``."""
  return float(np.mean(np.argmax(predict(x, w, class_emb), axis=1) == np.asarray(labels)))


# --- LFA and U-LFA. ---------------------------------------------------------------------------


def fit(x: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
        config: LFAConfig = DEFAULT_CONFIG, return_info: bool = False
        ) -> np.ndarray | tuple[np.ndarray, dict]:
  """Supervised LFA: beta-Procrustes (beta cross-validated unless ``config.beta``) on
  ``T = class_emb[labels]``, then ``refine``. Inputs are L2-normalised here.

  Args:
    x: [N, D] image features of the shots; labels: [N] int in [0, C); class_emb: [C, D].
    return_info: also return ``{'beta': ...}``.
  Returns:
    W: [D, D] float32 (and the info dict).
  """
  x, t, labels = normalize(x), normalize(class_emb), np.asarray(labels)
  if x.shape[1] != t.shape[1]:
    raise ValueError(f"feature dim {x.shape[1]} != class embedding dim {t.shape[1]}; "
                     "reduce the larger with gaussian_projection first")
  beta = config.beta
  if beta is None:
    beta = choose_beta(x, labels, t, np.linspace(0.0, 1.0, config.n_betas), config.cv_splits,
                       config.cv_frac, config.seed)
  w = refine(blend(procrustes(x, t[labels]), beta), x, labels, t, config)
  return (w, {"beta": float(beta)}) if return_info else w


@functools.partial(jax.jit, static_argnames=("epsilon", "threshold", "max_iterations"))
def _sinkhorn(x: jax.Array, t: jax.Array, epsilon: float, threshold: float,
              max_iterations: int) -> tuple[jax.Array, jax.Array]:
  # ott is imported here: only U-LFA needs it.
  from ott.geometry import epsilon_scheduler, geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn

  # |x - t|^2 = 2 - 2 <x, t> for unit rows, computed once (a PointCloud geometry recomputes it
  # at every Sinkhorn iteration: about 2.5x slower here). Uniform marginals are ott's default.
  cost = jnp.maximum(2.0 - 2.0 * x @ t.T, 0.0)
  # GeomLoss-style epsilon-scaling (it anneals from the squared diameter of the clouds' bounding
  # box by scaling^2 = 0.95^2 per iteration): here from 8, twice the largest cost |x - t|^2, down
  # to epsilon, then (unlike GeomLoss, which stops there) on at epsilon until the marginals
  # match to ``threshold``. Only the speed depends on the annealing, not the converged plan.
  eps = epsilon_scheduler.Epsilon(epsilon, init=8.0 / epsilon, decay=0.95**2)
  out = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations)(
      linear_problem.LinearProblem(geometry.Geometry(cost_matrix=cost, epsilon=eps)))
  return out.matrix, out.converged


def sinkhorn_plan(x: np.ndarray, class_emb: np.ndarray, blur: float = 0.05,
                  threshold: float = 1e-4, max_iterations: int = 10000) -> np.ndarray:
  """[N, C] entropic OT plan between the L2-normalised rows of ``x`` and ``class_emb`` with
  uniform marginals (rows sum to ``1/N``, columns to ``1/C``), cost ``|x - t|^2`` and
  ``epsilon = 2 blur^2`` (GeomLoss ``SamplesLoss('sinkhorn', p=2, blur)``'s cost is
  ``|x - t|^2 / 2`` with ``epsilon = blur^2``). Solved by ``ott`` (log-domain Sinkhorn with
  GeomLoss's epsilon annealing) until the L1 marginal error is below ``threshold``; a plan
  that did not converge is returned with a warning."""
  plan, converged = _sinkhorn(jnp.asarray(normalize(x)), jnp.asarray(normalize(class_emb)),
                              float(2.0 * blur**2), float(threshold), int(max_iterations))
  plan = np.asarray(plan, np.float64)
  if not np.all(np.isfinite(plan)):
    raise FloatingPointError("Sinkhorn produced a non-finite transport plan")
  if not bool(converged):
    warnings.warn(f"Sinkhorn did not reach threshold {threshold} in {max_iterations} iterations",
                  stacklevel=2)
  return plan


def sinkhorn_assignment(x: np.ndarray, class_emb: np.ndarray, blur: float = 0.05,
                        threshold: float = 1e-4, max_iterations: int = 10000) -> np.ndarray:
  """[N, C] soft assignments: ``sinkhorn_plan`` with each row renormalised to sum to 1
  (official ``sinkhorn_assignment``); column sums are ``N / C`` (balanced classes)."""
  plan = sinkhorn_plan(x, class_emb, blur, threshold, max_iterations)
  return plan / np.maximum(plan.sum(axis=1, keepdims=True), 1e-300)


def fit_unsupervised(x: np.ndarray, class_emb: np.ndarray, config: LFAConfig = DEFAULT_CONFIG,
                     return_info: bool = False) -> np.ndarray | tuple[np.ndarray, dict]:
  """U-LFA (official ``iterative_unsupervised_refinement``): Sinkhorn pseudo-labels ->
  beta-Procrustes (beta cross-validated on them unless ``config.beta``) -> ``unsup_rounds``
  rounds of (Sinkhorn pseudo-labels of ``xW / |xW|``, ``refine`` from the current W with
  ``unsup_batch_frac`` of the samples per step). Inputs are L2-normalised here.

  Args:
    x: [N, D] unlabelled image features; class_emb: [C, D].
    return_info: also return ``{'beta': ..., 'pseudo_labels': [N] of the last round}``.
  Returns:
    W: [D, D] float32 (and the info dict).
  """
  c = config
  x, t = normalize(x), normalize(class_emb)
  if x.shape[1] != t.shape[1]:
    raise ValueError(f"feature dim {x.shape[1]} != class embedding dim {t.shape[1]}; "
                     "reduce the larger with gaussian_projection first")

  def pseudo(features):
    soft = sinkhorn_assignment(features, t, c.sinkhorn_blur, c.sinkhorn_threshold,
                               c.sinkhorn_max_iterations)
    return soft.max(axis=1) > c.pseudo_label_threshold, soft.argmax(axis=1)

  keep, labels = pseudo(x)
  beta = c.beta
  if beta is None:
    beta = choose_beta(x[keep], labels[keep], t, np.linspace(0.0, 1.0, c.n_betas),
                       c.cv_splits, c.cv_frac, c.seed)
  w = blend(procrustes(x[keep], t[labels[keep]]), beta)
  for r in range(c.unsup_rounds):
    keep, labels = pseudo(x @ w)
    w = refine(w, x[keep], labels[keep], t, c, seed=c.seed + 1 + r,
               batch_frac=c.unsup_batch_frac)
  return (w, {"beta": float(beta), "pseudo_labels": labels}) if return_info else w


def gaussian_projection(x: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
  """Reduce ``x`` ([N, D], D >= dim) to ``dim`` dimensions by a Gaussian random projection
  ``x R``, ``R_ij ~ N(0, 1 / dim)`` (``sklearn``'s ``GaussianRandomProjection``, which the
  official code uses with ``random_state=0`` to bring a uni-modal vision model's and a text
  model's features to one dimension), then L2-normalise. The same ``seed`` gives the same ``R``
  for every call with the same ``(D, dim)`` (apply it to train and test alike)."""
  x = np.asarray(x, np.float32)
  if x.shape[1] < dim:
    raise ValueError(f"cannot project {x.shape[1]} dims up to {dim}")
  if x.shape[1] == dim:
    return normalize(x)
  r = np.random.default_rng(seed).normal(0.0, 1.0 / np.sqrt(dim), (x.shape[1], dim))
  return normalize(x @ r.astype(np.float32))
