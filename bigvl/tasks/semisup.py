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

``p = softmax(model(x))``. ``input.noise_std = s > 0`` adds Gaussian noise to every training
input after normalisation, ``x + s * N(0, 1)`` (labeled images and every unlabeled view, a
fresh draw per view and step): the input perturbation of the Pi-model / Temporal Ensembling
(Laine & Aila 2017, ``s = 0.15``) and Mean Teacher (Tarvainen & Valpola 2017); dropout inside
the network is the model's (``model.stage_dropout`` of ``small_cnn``).

Each method is one unit in ``bigvl.tasks.semisup_methods.METHODS``
(its knobs and their defaults from the papers, its views, state, unlabeled loss and
after-step update); this module holds what they share: data, model, normalisation, the shared
train-mode forward and the supervised term. A knob in ``config.semisup`` that the chosen
method does not have is an error.

Task state (checkpointed with the train state): ``batch_stats`` (BN running statistics,
updated by ``loss``) plus what the method's ``init`` adds: Mean Teacher's ``teacher``
(``params`` + ``batch_stats``, EMA of the student's, updated in ``after_step``); Temporal
Ensembling's ``ensemble`` ``[N_u, C]`` and ``ensemble_count`` ``[N_u]`` (rows indexed by the
unlabeled example's ``index``).

Evaluation (``bigvl/tasks/base.py``): eval kind ``'image_label'``; prediction functions
``'logits'`` (the trained model) and the method's own (Mean Teacher: ``'teacher_logits'``).

Config read: ``method``, ``seed``, ``semisup.*``, ``input.{dataset, data_dir, train_split,
num_labels, label_seed, batch_size, num_threads, flip, max_translate, noise_std,
strong_num_ops, strong_ops, image_key, label_key, mean, std, transforms,
unlabeled_transforms}``
(``transforms`` / ``unlabeled_transforms``: op-spec lists that replace the default labeled /
unlabeled pipelines, see ``_default_transforms``), ``model.{name, ...}`` (``wide_resnet`` |
``small_cnn``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from bigvl import parallel, registry
from bigvl.config import ConfigError, Reader, check_choice, positive_int
from bigvl.data import augment, pipeline, sources, streams, transforms
from bigvl.data.labels import labeled_indices
from bigvl.losses import consistency as C
from bigvl.tasks import base
from bigvl.tasks import semisup_methods as methods

#: Integer knobs that must be > 0 (other integer knobs: >= 0).
_POSITIVE_INTS = ("mu", "num_augs", "power_iterations")
#: Float knobs in [0, 1] (other float knobs: >= 0; ``temperature`` > 0).
_UNIT_INTERVAL = ("threshold", "ensemble_momentum", "ema_decay", "ema_decay_rampup")


def read_hparams(config: Reader, method: str, defaults: methods.Hparams) -> dict[str, Any]:
  """``config.semisup`` over the method's ``defaults``, type- and range-checked; a knob not in
  ``defaults`` is a ConfigError naming the method's knobs."""
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
      if value < 0 or (name in _POSITIVE_INTS and value == 0):
        raise ConfigError(f"config.semisup.{name} must be > 0, got {value}")
    else:
      value = float(sem.typed(name, (float, int), default))
      if value < 0:
        raise ConfigError(f"config.semisup.{name} must be >= 0, got {value}")
    out[name] = value
  for name in _UNIT_INTERVAL:
    if name in out and not 0 <= out[name] <= 1:
      raise ConfigError(f"config.semisup.{name} must be in [0, 1], got {out[name]}")
  if "temperature" in out and out["temperature"] <= 0:
    raise ConfigError(f"config.semisup.temperature must be > 0, got {out['temperature']}")
  return out


def _derived_seed(seed: int, stream: int) -> int:
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0] % (2**31 - 1))


class Task(base.Task):
  progress_keys = ("sup_loss", "unsup_loss", "w_u", "mask", "u_acc")
  eval_kinds = ("image_label",)

  def __init__(self, config: Reader, mesh: Mesh):
    super().__init__(config, mesh)
    self.method = check_choice("config.method", config.typed("method", str),
                               tuple(methods.METHODS))
    self.unit: methods.Method = methods.METHODS[self.method]
    self.hp = read_hparams(config, self.method, self.unit.defaults)
    self.views = tuple(self.unit.views(self.hp))
    if bool(self.views) != ("mu" in self.hp):
      raise ConfigError(f"method {self.method!r}: a unit with unlabeled views needs the knob "
                        f"'mu' and one with 'mu' needs views; it has views {self.views}")
    seed = config.typed("seed", int)

    inp = config.input
    self.dataset = inp.typed("dataset", str)
    self.data_dir = sources.data_dir(inp.typed("data_dir", str, None))
    self.image_key = inp.typed("image_key", str, "image")
    self.label_key = inp.typed("label_key", str, "label")
    self.batch_size = positive_int(inp, "batch_size")
    self.host_batch = parallel.batch_size_per_host(self.batch_size, mesh)
    self.mu = self.hp.get("mu", 0)
    self.unlabeled_batch_size = self.mu * self.batch_size
    if self.mu:
      self.host_unlabeled_batch = parallel.batch_size_per_host(
          self.unlabeled_batch_size, mesh, "the unlabeled batch (mu x config.input.batch_size)")
    self.num_threads = positive_int(inp, "num_threads", 2)
    self.flip = inp.typed("flip", bool, False)
    self.max_translate = float(inp.typed("max_translate", (float, int), 0.125))
    self.noise_std = float(inp.typed("noise_std", (float, int), 0.0))
    if self.noise_std < 0:
      raise ConfigError(f"config.input.noise_std must be >= 0, got {self.noise_std}")
    self.strong_num_ops = positive_int(inp, "strong_num_ops", 2)
    self.strong_ops = tuple(inp.get("strong_ops", tuple(augment.OPS)))
    bad = sorted(set(self.strong_ops) - set(augment.OPS))
    if bad or not self.strong_ops:
      raise ConfigError(f"config.input.strong_ops: unknown ops {bad}; known: "
                        f"{', '.join(augment.OPS)}")

    labeled, unlabeled = self._default_transforms()
    self.labeled_transform = transforms.build(
        inp.typed("transforms", (list, tuple), labeled), where=f"{inp.path}.transforms")
    self.unlabeled_transform = transforms.build(
        inp.typed("unlabeled_transforms", (list, tuple), unlabeled),
        where=f"{inp.path}.unlabeled_transforms") if self.views else None

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
    self.ctx = methods.Context(hp=self.hp, apply=self._apply, num_classes=self.num_classes,
                       num_unlabeled=len(self.unlabeled))

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

  @property
  def examples_per_step(self) -> int:
    """Images one step processes: ``B`` labeled + ``mu * B`` unlabeled x the method's number
    of views ``V`` (each view is an augmented image that goes through the model, whether in
    the shared forward, the label guess or the teacher)."""
    return self.batch_size + self.unlabeled_batch_size * len(self.views)

  def _default_transforms(self) -> tuple[list, list]:
    """The labeled and unlabeled pipelines as op specs (``bigvl.data.transforms``):
    labeled -> ``{'image': weak view, 'label'}``; unlabeled -> ``{'image': the method's views
    stacked [V, H, W, C], 'index': its row in the unlabeled set, 'label': -1 if none (only
    for the ``u_acc`` diagnostic, never a loss)}``."""
    img = [] if self.image_key == "image" else [{"op": "copy", "args": [{self.image_key:
                                                                          "image"}]}]
    view = {"weak": {"op": "weak", "flip": self.flip, "max_translate": self.max_translate},
            "strong": {"op": "strong", "flip": self.flip, "max_translate": self.max_translate,
                       "num_ops": self.strong_num_ops, "ops": list(self.strong_ops)}}
    labeled = [*img, view["weak"], {"op": "cast", "key": self.label_key, "out": "label"},
               {"op": "keep", "keys": ["image", "label"]}]
    unlabeled = [*img, {"op": "views", "args": [[view[v]] for v in self.views], "out": "image"},
                 {"op": "cast", "key": "index"},
                 {"op": "cast", "key": self.label_key, "out": "label", "default": -1},
                 {"op": "keep", "keys": ["image", "index", "label"]}]
    return labeled, unlabeled

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
    return params, self.unit.init(self.ctx, params, {"batch_stats": variables["batch_stats"]})

  def forward(self, ctx: methods.Context, inp: methods.StepInput) -> methods.Forward:
    """The shared forward: ONE train-mode pass over the labeled batch and the method's first
    ``forward_views`` unlabeled views (the ones that get a gradient), so batch norm normalises
    over the whole batch (as FixMatch / MixMatch do). Labeled targets: the labels."""
    n, b = self.unit.forward_views, inp.x_l.shape[0]
    logits, batch_stats = ctx.apply(inp.params, inp.state["batch_stats"],
                                    jnp.concatenate([inp.x_l, *inp.views[:n]]), inp.rng)
    logits_u = tuple(jnp.split(logits[b:], n)) if n else ()
    metrics = {"acc": methods.accuracy(logits[:b], inp.y)}
    if logits_u:
      metrics["u_acc"] = methods.accuracy(logits_u[0], inp.unlabeled["label"])
    return methods.Forward(logits_l=logits[:b], targets_l=inp.y, logits_u=logits_u,
                   batch_stats=batch_stats, metrics=metrics)

  def loss(self, params, state, batch, rng, step):
    """``L = mean_b CE(f(x_b), y_b) + w(t) * L_u`` (the unit's ``forward`` may replace the
    shared one and with it the labeled rows and targets; see ``semisup_methods``)."""
    unit = self.unit
    rng_drop, rng_method = jax.random.split(rng)
    unl = batch.get("unlabeled", {})
    images = [self.normalize(batch["labeled"]["image"]),
              *(self.normalize(unl["image"][:, v]) for v in range(len(self.views)))]
    if self.noise_std:
      keys = jax.random.split(jax.random.fold_in(rng, 1), len(images))
      images = [x + self.noise_std * jax.random.normal(k, x.shape, x.dtype)
                for x, k in zip(images, keys, strict=True)]
    inp = methods.StepInput(
        params=params, state=state, x_l=images[0], y=batch["labeled"]["label"],
        views=tuple(images[1:]),
        unlabeled={k: v for k, v in unl.items() if k != "image"}, rng=rng_drop,
        rng_method=rng_method, step=step)
    fwd = (unit.forward or self.forward)(self.ctx, inp)
    sup = jnp.mean(C.cross_entropy(fwd.logits_l, fwd.targets_l))
    metrics = {**fwd.metrics, "sup_loss": sup}
    if unit.unsup is None:
      return sup, (metrics, {**state, "batch_stats": fwd.batch_stats})
    unsup, w, unit_metrics, new_state = unit.unsup(self.ctx, inp, fwd)
    metrics.update(unit_metrics, unsup_loss=unsup, w_u=w)
    return sup + w * unsup, (metrics, {**new_state, "batch_stats": fwd.batch_stats})

  def after_step(self, params: Any, state: Any, step: jax.Array) -> Any:
    return self.unit.after_step(self.ctx, params, state, step)

  # --- evaluation ---------------------------------------------------------------------------
  def _predict_fn(self, variables: Callable[[Any, Any], Any]) -> base.PredictFn:
    def predict(params: Any, state: Any, batch: Any) -> jax.Array:
      return self.model.apply(variables(params, state), self.normalize(batch["image"]),
                              train=False)
    return predict

  def predict_fns(self) -> dict[str, base.PredictFn]:
    """``{'logits': eval-mode logits [N, K] of ``batch['image']`` (uint8; running BN
    statistics), plus the method's own (Mean Teacher: ``'teacher_logits'``)}``."""
    student = lambda params, state: {"params": params, "batch_stats": state["batch_stats"]}
    return {"logits": self._predict_fn(student),
            **{name: self._predict_fn(v) for name, v in self.unit.predictors.items()}}

  def eval_transform(self, kind: str, **opts: Any) -> base.EvalTransform:
    """``'image_label'``: ``example -> {'image': uint8 [H, W, C], 'label': int32}`` read from
    ``input.image_key`` / ``input.label_key``."""
    if kind not in self.eval_kinds:
      return super().eval_transform(kind, **opts)
    if opts:
      raise ConfigError(f"eval data {kind!r} of task semisup takes no options, got "
                        f"{', '.join(sorted(opts))}")
    image_key, label_key = self.image_key, self.label_key
    return lambda ex: {"image": np.asarray(ex[image_key], np.uint8),
                       "label": np.int32(ex[label_key])}
