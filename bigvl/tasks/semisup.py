"""Semi-supervised image classification: the method families of Ouali et al. 2020 ("An Overview
of Deep Semi-Supervised Learning") as one task, chosen by ``config.method``.

Every step sees a labeled batch of ``B`` images (``config.input.batch_size``, weakly augmented)
and, except for ``supervised``, an unlabeled batch of ``mu * B`` images, each in the views its
method needs (weak / strong augmentations made on the host by ``bigvl.data.augment`` inside
the grain pipeline). The loss is ``L = CE(labeled) + w(t) * L_u``:

===================  =========================================================================
method               ``L_u`` (unlabeled views)
===================  =========================================================================
supervised           none (labeled data only; the baseline)
pi_model             ``mse(p(u1), p(u2))``, two weak views (Laine & Aila 2017)
temporal_ensembling  ``mse(p(u), Z~[i])``, ``Z`` a per-example EMA of past predictions
                     (Laine & Aila 2017)
mean_teacher         ``mse(p_student(u1), p_teacher(u2))``, teacher = EMA of the student
                     (Tarvainen & Valpola 2017)
vat                  ``KL(p(u) || p(u + r_adv))``, ``r_adv`` by power iteration (Miyato 2018)
pseudo_label         ``1[max p >= tau] CE(argmax p(u), p(u))`` (Lee 2013)
entropy_min          ``H(p(u))`` (Grandvalet & Bengio 2005)
mixmatch             sharpened K-view label guess, MixUp of labeled + unlabeled,
                     ``mse`` on mixed unlabeled (Berthelot et al. 2019); the labeled term is CE
                     on the mixed labeled batch
uda                  ``1[max p(w) >= beta] KL(sharpen(p(w), T) || p(s))``, w/s weak/strong
                     (Xie et al. 2020)
fixmatch             ``1[max p(w) >= tau] CE(argmax p(w), p(s))`` (Sohn et al. 2020)
===================  =========================================================================

``p = softmax(model(x))``; targets are gradient-stopped except the Pi-model's. Each method's
knobs live in ``config.semisup`` (defaults: :data:`DEFAULTS`, from the papers); a knob of
another method there is an error.

Task state (checkpointed with the train state): ``batch_stats`` (BN running statistics,
updated by ``loss``); Mean Teacher's ``teacher`` (``params`` + ``batch_stats``, EMA of the
student's, updated in ``after_step``); Temporal Ensembling's ``ensemble`` ``[N_u, C]`` and
``ensemble_count`` ``[N_u]`` (rows indexed by the unlabeled example's ``index``).

Config read: ``method``, ``seed``, ``semisup.*``, ``input.{dataset, data_dir, train_split,
num_labels, label_seed, batch_size, num_threads, flip, max_translate, strong_num_ops,
strong_ops, image_key, label_key, mean, std}``, ``model.{name, ...}`` (``wide_resnet`` |
``small_cnn``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import augment, pipeline, sources, streams
from bigvl.data.digits import labeled_indices
from bigvl.losses import consistency as C
from bigvl.tasks import base

METHODS = ("supervised", "pi_model", "temporal_ensembling", "mean_teacher", "vat",
           "pseudo_label", "entropy_min", "mixmatch", "uda", "fixmatch")

#: Each method's knobs (``config.semisup.<knob>``) and their defaults, from the papers.
#: ``mu``: unlabeled batch = mu * labeled batch; ``lambda_u``: the unlabeled weight (its
#: maximum where it ramps up); ``rampup_steps``: length of the ramp-up (sigmoid for Pi / TE /
#: Mean Teacher, linear for Pseudo-Label / MixMatch; 0 = none).
DEFAULTS: dict[str, dict[str, Any]] = {
    "supervised": {},
    # Laine & Aila 2017: w_max 100 (relative to the labeled CE: their M/N scaling cancels),
    # Gaussian ramp-up over 80 epochs (40k steps of 100).
    "pi_model": {"mu": 1, "lambda_u": 100.0, "rampup_steps": 40_000},
    # Laine & Aila 2017: w_max 30, ensemble momentum alpha 0.6.
    "temporal_ensembling": {"mu": 1, "lambda_u": 30.0, "rampup_steps": 40_000,
                            "ensemble_momentum": 0.6},
    # Tarvainen & Valpola 2017 (their CIFAR/SVHN code): consistency cost 100, ramp-up 40k
    # steps, EMA decay 0.99 during the ramp-up and 0.999 after.
    "mean_teacher": {"mu": 1, "lambda_u": 100.0, "rampup_steps": 40_000, "ema_decay": 0.999,
                     "ema_decay_rampup": 0.99},
    # Miyato et al. 2018: alpha 1, xi 1e-6, one power iteration; eps 6.0 as in Oliver et al.
    # 2018 (WRN-28-2, CIFAR-10). eps is an L2 norm over the whole normalised image.
    "vat": {"mu": 1, "lambda_u": 1.0, "eps": 6.0, "xi": 1e-6, "power_iterations": 1},
    # Lee 2013 with the confidence threshold and weight of Oliver et al. 2018.
    "pseudo_label": {"mu": 1, "lambda_u": 1.0, "threshold": 0.95, "rampup_steps": 0},
    # Grandvalet & Bengio 2005 (lambda is cross-validated there; 1 as in VAT+EntMin).
    "entropy_min": {"mu": 1, "lambda_u": 1.0},
    # Berthelot et al. 2019: T 0.5, K 2, Beta(0.75, 0.75), lambda_u 100 ramped up linearly
    # over 16k steps, 64 labeled + 64 unlabeled per batch.
    "mixmatch": {"mu": 1, "lambda_u": 100.0, "rampup_steps": 16_384, "temperature": 0.5,
                 "num_augs": 2, "mixup_alpha": 0.75},
    # Xie et al. 2020 (CIFAR-10): T 0.4, confidence beta 0.8, weight 1; mu 7 as FixMatch
    # ran it.
    "uda": {"mu": 7, "lambda_u": 1.0, "temperature": 0.4, "threshold": 0.8},
    # Sohn et al. 2020: tau 0.95, lambda_u 1, mu 7.
    "fixmatch": {"mu": 7, "lambda_u": 1.0, "threshold": 0.95},
}

#: The unlabeled views each method reads (``'weak'`` / ``'strong'`` augmentations).
VIEWS = {"supervised": (), "pi_model": ("weak", "weak"), "temporal_ensembling": ("weak",),
         "mean_teacher": ("weak", "weak"), "vat": ("weak",), "pseudo_label": ("weak",),
         "entropy_min": ("weak",), "uda": ("weak", "strong"), "fixmatch": ("weak", "strong")}


def default_hparams(method: str) -> dict[str, Any]:
  """A copy of :data:`DEFAULTS` for ``method`` (configs start from it)."""
  check_choice("config.method", method, METHODS)
  return dict(DEFAULTS[method])


def _read_hparams(config: Reader, method: str) -> dict[str, Any]:
  defaults = DEFAULTS[method]
  sem = config.get("semisup")
  if sem is None:
    return dict(defaults)
  unknown = sorted(set(sem.keys()) - set(defaults))
  if unknown:
    raise ConfigError(f"config.semisup.{unknown[0]} is not a knob of method {method!r}; its "
                      f"knobs: {', '.join(defaults) or 'none'}")
  out = {}
  for name, default in defaults.items():
    if isinstance(default, int):
      value = sem.typed(name, int, default)
      if value < 0 or (name in ("mu", "num_augs", "power_iterations") and value == 0):
        raise ConfigError(f"config.semisup.{name} must be > 0, got {value}")
    else:
      value = float(sem.typed(name, (float, int), default))
      if value < 0:
        raise ConfigError(f"config.semisup.{name} must be >= 0, got {value}")
    out[name] = value
  for name in ("threshold", "ensemble_momentum", "ema_decay", "ema_decay_rampup"):
    if name in out and not 0 <= out[name] <= 1:
      raise ConfigError(f"config.semisup.{name} must be in [0, 1], got {out[name]}")
  if "temperature" in out and out["temperature"] <= 0:
    raise ConfigError(f"config.semisup.temperature must be > 0, got {out['temperature']}")
  return out


def _derived_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0] % (2**31 - 1))


class Task(base.Task):
  progress_keys = ("sup_loss", "unsup_loss", "w_u", "mask", "u_acc")

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    self.method = check_choice("config.method", config.typed("method", str), METHODS)
    self.hp = _read_hparams(config, self.method)
    self.views = VIEWS.get(self.method, ("weak",) * self.hp.get("num_augs", 0))
    seed = config.typed("seed", int)

    inp = config.input
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.image_key = inp.typed("image_key", str, "image")
    self.label_key = inp.typed("label_key", str, "label")
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.mu = self.hp.get("mu", 0)
    if self.mu:
      self.unlabeled_batch_size = self.mu * self.batch_size
      self.host_unlabeled_batch = parallel.batch_size_per_host(self.unlabeled_batch_size, mesh)
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.flip = inp.typed("flip", bool, False)
    self.max_translate = float(inp.typed("max_translate", (float, int), 0.125))
    self.strong_num_ops = positive_int(inp, "strong_num_ops", 2)
    self.strong_ops = tuple(inp.get("strong_ops", tuple(augment.OPS)))
    bad = sorted(set(self.strong_ops) - set(augment.OPS))
    if bad or not self.strong_ops:
      raise ConfigError(f"config.input.strong_ops: unknown ops {bad}; known: "
                        f"{', '.join(augment.OPS)}")

    train_split = inp.typed("train_split", str, "train")
    self.train_source, info = sources.get_source(self.dataset, train_split, self.data_dir)
    labels = streams.read_labels(self.train_source, self.label_key)
    num_labels = positive_int(inp, "num_labels")
    label_seed = inp.typed("label_seed", int, seed)
    known = np.flatnonzero(labels >= 0)
    try:
      self.labeled_idx = known[labeled_indices(labels[known], num_labels, label_seed)]
    except ValueError as e:
      raise ConfigError(f"config.input.num_labels: {e}") from None
    self.unlabeled_idx = np.setdiff1d(np.arange(len(labels)), self.labeled_idx)
    self.labeled = streams.IndexedSubset(self.train_source, self.labeled_idx)
    self.unlabeled = streams.IndexedSubset(self.train_source, self.unlabeled_idx)
    if info is not None and self.label_key in info.features and hasattr(
        info.features[self.label_key], "num_classes"):
      self.num_classes = int(info.features[self.label_key].num_classes)
    else:
      self.num_classes = int(labels.max()) + 1
    self.mean, self.std = self._read_normalisation(inp)

    model_cfg = config.model
    self.model = registry.load("models", model_cfg.typed("name", str), "model").from_config(
        model_cfg, num_classes=self.num_classes)

  def _read_normalisation(self, inp: Reader) -> tuple[np.ndarray, np.ndarray]:
    """``input.mean`` / ``input.std`` (per channel, in 0..1 units), else estimated from up to
    1,024 evenly spaced train images."""
    mean, std = inp.get("mean"), inp.get("std")
    if mean is None or std is None:
      n = len(self.train_source)
      picks = np.linspace(0, n - 1, min(n, 1024)).astype(int)
      imgs = [self.train_source[int(i)] for i in picks]
      x = np.stack([ex[self.image_key] for ex in imgs if ex is not None]).astype(np.float64)
      x = x.reshape(-1, x.shape[-1]) / 255.0
      mean = x.mean(0) if mean is None else mean
      std = x.std(0) if std is None else std
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if np.any(std <= 0):
      raise ConfigError(f"config.input.std must be > 0, got {std.tolist()}")
    return mean, std

  # --- host side: data ----------------------------------------------------------------------
  @property
  def num_train_examples(self) -> int:
    """The labeled set: an epoch is one pass over it at ``batch_size`` per step."""
    return len(self.labeled)

  def _view(self, kind: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "weak":
      return augment.weak_augment(image, rng, flip=self.flip, max_translate=self.max_translate)
    return augment.strong_augment(image, rng, flip=self.flip, max_translate=self.max_translate,
                                  num_ops=self.strong_num_ops, ops=self.strong_ops)

  def labeled_transform(self, ex: dict, rng: np.random.Generator) -> dict:
    return {"image": self._view("weak", np.asarray(ex[self.image_key]), rng),
            "label": np.int32(ex[self.label_key])}

  def unlabeled_transform(self, ex: dict, rng: np.random.Generator) -> dict:
    """The method's views stacked ``[V, H, W, C]``, the example's ``index`` in the unlabeled
    set and its true ``label`` (-1 if none; only for the ``u_acc`` diagnostic, never a loss)."""
    image = np.asarray(ex[self.image_key])
    return {"image": np.stack([self._view(v, image, rng) for v in self.views]),
            "index": np.int32(ex["index"]), "label": np.int32(ex.get(self.label_key, -1))}

  def train_data(self, seed: int) -> streams.ZipIterator:
    ds = {"labeled": pipeline.batched(
        pipeline.train_stream(self.labeled, self.labeled_transform, _derived_seed(seed, 0)),
        self.host_batch, self.num_threads)}
    if self.mu:
      ds["unlabeled"] = pipeline.batched(
          pipeline.train_stream(self.unlabeled, self.unlabeled_transform,
                                _derived_seed(seed, 1)),
          self.host_unlabeled_batch, self.num_threads)
    return streams.ZipIterator(ds, (self.train_source,))

  # --- pure functions ------------------------------------------------------------------------
  def normalize(self, images: jax.Array) -> jax.Array:
    """uint8 images -> ``(x / 255 - mean) / std`` float32."""
    return (images.astype(jnp.float32) / 255.0 - self.mean) / self.std

  def _apply(self, params, batch_stats, x, rng, update_stats: bool = True):
    """Train-mode forward (batch statistics): ``(logits, new batch_stats)``; the running
    statistics are returned unchanged when ``update_stats`` is False."""
    logits, upd = self.model.apply({"params": params, "batch_stats": batch_stats}, x,
                                   train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    return logits, (upd["batch_stats"] if update_stats else batch_stats)

  def init(self, rng: jax.Array, batch: Any) -> tuple[Any, Any]:
    x = self.normalize(batch["labeled"]["image"])
    variables = self.model.init({"params": rng, "dropout": rng}, x, train=False)
    params = variables["params"]
    state = {"batch_stats": variables["batch_stats"]}
    if self.method == "mean_teacher":
      state["teacher"] = jax.tree.map(jnp.copy, {"params": params,
                                                 "batch_stats": state["batch_stats"]})
    if self.method == "temporal_ensembling":
      n = len(self.unlabeled)
      state["ensemble"] = jnp.zeros((n, self.num_classes), jnp.float32)
      state["ensemble_count"] = jnp.zeros((n,), jnp.int32)
    return params, state

  @property
  def predictors(self) -> tuple[str, ...]:
    """The models :meth:`predict` can evaluate (the first is the one trained)."""
    return ("student", "teacher") if self.method == "mean_teacher" else ("student",)

  def predict(self, params: Any, state: Any, images: jax.Array, which: str = "student"
              ) -> jax.Array:
    """Eval-mode logits ``[N, K]`` of uint8 images (running BN statistics)."""
    if which == "teacher":
      variables = state["teacher"]
    else:
      variables = {"params": params, "batch_stats": state["batch_stats"]}
    return self.model.apply(variables, self.normalize(images), train=False)

  def _weight(self, step: jax.Array, kind: str = "sigmoid") -> jax.Array:
    ramp = self.hp.get("rampup_steps", 0)
    if kind == "sigmoid":
      return self.hp["lambda_u"] * C.sigmoid_rampup(step, ramp)
    return self.hp["lambda_u"] * C.linear_rampup(step, ramp)

  def loss(self, params, state, batch, rng, step):
    hp, bs = self.hp, state["batch_stats"]
    xl = self.normalize(batch["labeled"]["image"])
    y = batch["labeled"]["label"]
    b = xl.shape[0]
    rng_drop, rng_method = jax.random.split(rng)
    new_state = dict(state)
    metrics = {}

    if self.method == "supervised":
      logits_l, new_state["batch_stats"] = self._apply(params, bs, xl, rng_drop)
      sup = jnp.mean(C.cross_entropy(logits_l, y))
      metrics.update(sup_loss=sup, acc=_accuracy(logits_l, y))
      return sup, (metrics, new_state)

    unl = batch["unlabeled"]
    views = [self.normalize(unl["image"][:, v]) for v in range(len(self.views))]
    u_label = unl["label"]
    m = self.method

    if m == "mixmatch":
      k, nu = len(views), views[0].shape[0]
      guess_logits, _ = self._apply(params, bs, jnp.concatenate(views), rng_drop, False)
      guess_logits = jax.lax.stop_gradient(guess_logits)
      q = C.guess_labels(guess_logits.reshape(k, nu, -1), hp["temperature"])
      x_all = jnp.concatenate([xl] + views)
      p_all = jnp.concatenate([jax.nn.one_hot(y, self.num_classes)] + [q] * k)
      r_perm, r_lam = jax.random.split(rng_method)
      perm = jax.random.permutation(r_perm, x_all.shape[0])
      lam = C.sample_mixup_lambda(r_lam, hp["mixup_alpha"], (x_all.shape[0],))
      x_mix, p_mix = C.mixup(x_all, p_all, x_all[perm], p_all[perm], lam)
      logits, new_state["batch_stats"] = self._apply(params, bs, x_mix, rng_drop)
      sup = jnp.mean(C.cross_entropy(logits[:b], p_mix[:b]))
      unsup = jnp.mean(C.mse(jax.nn.softmax(logits[b:]), p_mix[b:]))
      w = self._weight(step, "linear")
      metrics.update(u_acc=_accuracy(q, u_label))
      metrics.update(sup_loss=sup, unsup_loss=unsup, w_u=w)
      return sup + w * unsup, (metrics, new_state)

    # One train-mode forward over the labeled batch and every unlabeled view that gets a
    # gradient (as FixMatch / MixMatch do: the BN statistics see the whole batch).
    n_fwd = {"pi_model": 2, "uda": 2, "fixmatch": 2}.get(m, 1)
    logits, new_state["batch_stats"] = self._apply(
        params, bs, jnp.concatenate([xl] + views[:n_fwd]), rng_drop)
    logits_l = logits[:b]
    logits_u = jnp.split(logits[b:], n_fwd)
    sup = jnp.mean(C.cross_entropy(logits_l, y))
    metrics.update(acc=_accuracy(logits_l, y), u_acc=_accuracy(logits_u[0], u_label))
    w = jnp.asarray(hp["lambda_u"], jnp.float32)

    if m == "pi_model":
      unsup = jnp.mean(C.mse(jax.nn.softmax(logits_u[0]), jax.nn.softmax(logits_u[1])))
      w = self._weight(step, "sigmoid")
    elif m == "temporal_ensembling":
      alpha, idx = hp["ensemble_momentum"], unl["index"]
      z = jax.nn.softmax(logits_u[0])
      ens, count = state["ensemble"][idx], state["ensemble_count"][idx]
      seen = count > 0
      target = ens / jnp.where(seen, 1.0 - alpha ** count.astype(jnp.float32), 1.0)[:, None]
      unsup = jnp.mean(seen * C.mse(z, jax.lax.stop_gradient(target)))
      new_ens, _ = C.temporal_ensemble_update(ens, jax.lax.stop_gradient(z), alpha,
                                              (count + 1)[:, None])
      new_state["ensemble"] = state["ensemble"].at[idx].set(new_ens)
      new_state["ensemble_count"] = state["ensemble_count"].at[idx].set(count + 1)
      metrics["mask"] = jnp.mean(seen.astype(jnp.float32))
      w = self._weight(step, "sigmoid")
    elif m == "mean_teacher":
      teacher = state["teacher"]
      logits_t, _ = self._apply(teacher["params"], teacher["batch_stats"], views[1], rng_drop,
                                False)
      p_t = jax.lax.stop_gradient(jax.nn.softmax(logits_t))
      unsup = jnp.mean(C.mse(jax.nn.softmax(logits_u[0]), p_t))
      metrics["teacher_u_acc"] = _accuracy(logits_t, u_label)
      w = self._weight(step, "sigmoid")
    elif m == "vat":
      # Train-mode BN over the unlabeled batch alone, statistics not updated (as in the VAT
      # code), so p(u) and p(u + r) come from the same function of the input.
      def logits_fn(x):
        return self._apply(params, bs, x, rng_drop, False)[0]
      unsup = C.vat_loss(logits_fn, views[0], rng_method, xi=hp["xi"], eps=hp["eps"],
                         num_power_iterations=hp["power_iterations"])
    elif m == "pseudo_label":
      unsup = C.pseudo_label_loss(logits_u[0], hp["threshold"])
      metrics["mask"] = jnp.mean(C.fixmatch_mask(jax.nn.softmax(logits_u[0]), hp["threshold"]))
      w = self._weight(step, "linear")
    elif m == "entropy_min":
      unsup = jnp.mean(C.entropy(logits_u[0]))
    elif m == "uda":
      unsup = C.uda_loss(logits_u[0], logits_u[1], hp["temperature"], hp["threshold"])
      metrics["mask"] = jnp.mean(C.fixmatch_mask(jax.nn.softmax(logits_u[0]), hp["threshold"]))
    elif m == "fixmatch":
      unsup = C.fixmatch_loss(logits_u[0], logits_u[1], hp["threshold"])
      metrics["mask"] = jnp.mean(C.fixmatch_mask(jax.nn.softmax(logits_u[0]), hp["threshold"]))
    else:  # pragma: no cover -- METHODS is checked in __init__
      raise AssertionError(m)
    metrics.update(sup_loss=sup, unsup_loss=unsup, w_u=w)
    return sup + w * unsup, (metrics, new_state)

  def after_step(self, params: Any, state: Any, step: jax.Array) -> Any:
    if self.method != "mean_teacher":
      return state
    hp = self.hp
    decay = jnp.where(step < hp["rampup_steps"], hp["ema_decay_rampup"], hp["ema_decay"])
    # As in the Mean Teacher code: a plain average of the first steps' students.
    decay = jnp.minimum(decay, 1.0 - 1.0 / (step.astype(jnp.float32) + 2.0))
    student = {"params": params, "batch_stats": state["batch_stats"]}
    return {**state, "teacher": C.ema_update(state["teacher"], student, decay)}


def _accuracy(logits_or_probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy over the rows with a known label (``label >= 0``)."""
  known = (labels >= 0).astype(jnp.float32)
  hit = (jnp.argmax(logits_or_probs, -1) == labels).astype(jnp.float32) * known
  return jnp.sum(hit) / jnp.maximum(jnp.sum(known), 1.0)
