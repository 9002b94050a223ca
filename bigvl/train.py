"""The one train loop. Every task runs through :func:`train`; none copies it.

``config -> mesh -> task (data + model + loss) -> optimizer -> jit(train_step) -> loop``:

* everything is built and the config audited (unknown keys, bad values) before compiling;
* the train step is one ``jax.jit`` with in/out shardings from the parameters' logical axes
  and ``config.logical_axis_rules``; frozen parameters are held, never differentiated;
  a step whose loss, gradient or learning rate is not finite is refused (state unchanged)
  and counted;
* orbax checkpoints carry params, optimizer state, task state, step, rng and the data
  iterator's state: re-running the same command resumes and continues exactly;
* metrics go to ``metrics.jsonl``, TensorBoard and a progress line; evaluators run every
  ``config.evals.<name>.every`` steps and at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bigvl import checkpoint, heap, metrics, optim, parallel, plots, registry
from bigvl.config import RUNTIME_DEFAULTS, ConfigError, Reader, positive_int, read_knobs
from bigvl.tasks.base import EvalView, Task

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
  """Everything a run needs, built from the config before anything compiles."""

  config: ml_collections.ConfigDict
  task: Task
  mesh: jax.sharding.Mesh
  rules: tuple  # logical axis name -> mesh axes
  is_frozen: Any  # path -> bool: not trained (config.optim.frozen or the task)
  weights: list  # checkpoint.WeightSource: read after a fresh init
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  seed: int
  total_steps: int
  log_every: int
  ckpt_every: int
  keep_ckpts: int
  microbatches: int
  evaluators: list  # (name, evaluator, every)
  tool: Any = None  # config.tool: a bigvl.tools module's Tool, run instead of training
  eval_at_start: bool = False  # config.eval_at_start: evaluate the starting point (step 0)
  runtime: dict = dataclasses.field(default_factory=lambda: dict(RUNTIME_DEFAULTS))


def duration_steps(r: Reader, prefix: str, num_examples: int | None, batch_size: int) -> int:
  """``<prefix>_steps`` | ``<prefix>_epochs`` | ``<prefix>_examples`` -> steps (exactly one)."""
  given = {u: r.get(f"{prefix}_{u}") for u in ("steps", "epochs", "examples")}
  given = {u: v for u, v in given.items() if v is not None}
  if len(given) != 1:
    raise ConfigError(f"give exactly one of config.{prefix}_steps/_epochs/_examples, got "
                      f"{sorted(given) or 'none'}")
  unit, value = next(iter(given.items()))
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
    raise ConfigError(f"config.{prefix}_{unit} must be a positive number, got {value!r}")
  if unit == "steps":
    if not isinstance(value, int):
      raise ConfigError(f"config.{prefix}_steps must be int, got {value!r}")
    return value
  if unit == "epochs":
    if not num_examples:
      raise ConfigError(f"config.{prefix}_epochs needs a dataset of known size")
    value = value * num_examples
  return max(1, int(round(value / batch_size)))


def build(config: ml_collections.ConfigDict, devices: list | None = None) -> Run:
  """Validates and builds a run. Raises ConfigError (exit 2 in bigvl.main) on a bad config.

  ``devices``: the mesh's devices (default: all).
  """
  r = Reader(config)
  seed = r.typed("seed", int)
  mesh = parallel.make_mesh(r.mesh, devices)
  rules = parallel.check_logical_rules(r.get("logical_axis_rules"))
  task = registry.load("tasks", r.typed("task", str), "task").Task(r, mesh)
  total = duration_steps(r, "total", task.num_train_examples, task.batch_size)
  tx, sched = optim.make_optimizer(r.optim, r.get("schedule"), total)
  frozen_rx = optim.frozen_predicate(r.optim)
  is_frozen = lambda path: frozen_rx(path) or not task.trainable(path)
  tool_name = r.typed("tool", str, None)
  tool = None
  if tool_name:  # a tool uses the task's model and weights: nothing is trained
    tool = registry.load("tools", tool_name, "tool").Tool(r, task, mesh)
    is_frozen = lambda path: True
  weights = list(task.pretrained()) + read_init_from(r.get("init_from"))
  evaluators = []
  view = EvalView(task)
  for name, ecfg in (r.get("evals") or Reader({}, "config.evals")).items():
    mod = registry.load("evaluators", ecfg.typed("type", str), "evaluator")
    every = positive_int(ecfg, "every", total)
    evaluators.append((name, mod.Evaluator(ecfg, view, mesh), every))
  run = Run(config=config, task=task, mesh=mesh, rules=rules, is_frozen=is_frozen,
            weights=weights, tx=tx, schedule=sched,
            seed=seed, total_steps=total, log_every=positive_int(r, "log_every"),
            ckpt_every=positive_int(r, "ckpt_every"),
            keep_ckpts=positive_int(r, "keep_ckpts", 2),
            microbatches=positive_int(r, "microbatches", 1), evaluators=evaluators,
            tool=tool, eval_at_start=bool(r.typed("eval_at_start", bool, False)),
            runtime=read_runtime(r.get("runtime")))
  shards = run.microbatches * int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
  if task.batch_size % shards:
    raise ConfigError(f"config.input.batch_size={task.batch_size} is not divisible by "
                      f"microbatches x data shards = {shards}")
  r.check_all_read()
  return run


def read_runtime(r: Reader | None) -> dict:
  """``config.runtime`` over :data:`RUNTIME_DEFAULTS` (ConfigError on an unknown knob or a
  negative step count)."""
  out = read_knobs(r, RUNTIME_DEFAULTS, "config.runtime")
  for name in ("profile_start", "profile_steps"):
    if out[name] < 0:
      raise ConfigError(f"config.runtime.{name} must be >= 0, got {out[name]}")
  try:
    heap.resolve(out["host_heap"])
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return out


def read_init_from(r: Reader | None) -> list[checkpoint.WeightSource]:
  """``config.init_from.<name> = {path, dst='params', src=None, keep_init=None}``: weights
  read into the state after a fresh init (never on resume; ``keep_init``: a regex of paths
  below ``dst`` the file lacks and that keep their init), e.g. a previous run's image tower
  ``{path: '/runs/siglip', dst: 'params/img'}``, a ``.safetensors`` file, or a Hugging Face
  checkpoint directory (``config.json`` + safetensors: :func:`bigvl.convert.weight_sources`
  maps its names and layouts, e.g. ``{path: '/ckpt/Qwen2-0.5B', dst: 'params/llm'}``)."""
  out = []
  for _, c in (r.items() if r is not None else ()):
    what = f"{c.path}.path"
    path = c.typed("path", str, None)
    if not path:
      raise ConfigError(f"{what} is not set: name the weights to start from (a bigvl run, a "
                        f".safetensors file or a Hugging Face checkpoint directory)")
    dst = c.typed("dst", str, "params")
    if dst.partition("/")[0] not in ("params", "extra"):
      raise ConfigError(f"{c.path}.dst={dst!r} must start with 'params' or 'extra'")
    src = c.typed("src", str, None)
    keep_init = c.typed("keep_init", str, None)  # regex: paths that keep their fresh init
    out.extend(checkpoint.weight_sources(path, dst, src=src, keep_init=keep_init, what=what))
  return out


def split_params(params: Any, is_frozen: Any) -> tuple[dict, dict]:
  """A nested dict of parameters -> ``(trainable, frozen)`` nested dicts holding only their
  leaves (empty sub-dicts dropped); ``is_frozen(path)`` on ``'/'``-joined paths."""
  def split(node, prefix):
    if not isinstance(node, dict):
      return (None, node) if is_frozen(prefix) else (node, None)
    t, f = {}, {}
    for k, v in node.items():
      a, b = split(v, f"{prefix}/{k}" if prefix else str(k))
      if a is not None and not (isinstance(a, dict) and not a):
        t[k] = a
      if b is not None and not (isinstance(b, dict) and not b):
        f[k] = b
    return t, f
  return split(params, "")


def merge_params(a: dict, b: dict) -> dict:
  """The inverse of :func:`split_params`: one nested dict with the leaves of both."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge_params(out[k], v) if k in out and isinstance(v, dict) else v
  return out


def make_train_step(task: Task, tx: optax.GradientTransformation, sched: optax.Schedule,
                    microbatches: int = 1):
  """The pure train step ``(state, batch) -> (state, metrics)``; not yet jitted.

  Only ``state['params']`` (the trainable leaves) is differentiated and updated;
  ``state['frozen']`` is merged in for the forward pass and never gets a gradient.

  ``microbatches > 1`` accumulates gradients over that many slices of the batch in a
  ``lax.scan`` (same update as one big batch for losses that are means over examples; a
  contrastive loss then sees each slice's negatives only). Slice ``i`` takes rows
  ``i, i + m, i + 2m, ...`` so every device keeps its own rows: no communication.
  """

  def grads_of(params, frozen, extra, batch, rng, step):
    def loss_fn(p):
      return task.loss(merge_params(p, frozen), extra, batch, rng, step)
    (loss, (aux, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, aux, extra, grads

  def accumulated(params, frozen, extra, batch, rng, step):
    m = microbatches
    slices = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1), batch)

    def body(carry, inp):
      extra, acc = carry
      i, mb = inp
      loss, aux, extra, grads = grads_of(params, frozen, extra, mb, jax.random.fold_in(rng, i),
                                         step)
      return (extra, jax.tree.map(jnp.add, acc, grads)), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    (extra, grads), (losses, auxs) = jax.lax.scan(body, (extra, zeros),
                                                  (jnp.arange(m), slices))
    mean = lambda x: jnp.mean(x, axis=0)
    return (mean(losses), jax.tree.map(mean, auxs), extra,
            jax.tree.map(lambda g: g / m, grads))

  def train_step(state: dict, batch: Any) -> tuple[dict, dict]:
    step = state["step"]
    rng = jax.random.fold_in(state["rng"], step)
    fn = grads_of if microbatches == 1 else accumulated
    frozen = state["frozen"]
    loss, aux, extra, grads = fn(state["params"], frozen, state["extra"], batch, rng, step)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    extra = task.after_step(merge_params(params, frozen), extra, step)
    gnorm = optax.global_norm(grads)
    # A finite loss and gradient still give a non-finite update under a non-finite learning
    # rate: refuse that too, so such a state is never kept or checkpointed. (Checking the
    # update tensors themselves would add a consumer to them, which changes XLA's fusion and
    # so the last bits of every step: the committed results would no longer reproduce.)
    lr = sched(step)
    ok = jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(lr)
    new = {"params": params, "opt_state": opt_state, "extra": extra}
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new,
                        {k: state[k] for k in new})
    skipped = state["skipped"] + (1 - ok.astype(jnp.int32))
    out = {**kept, "frozen": frozen, "step": step + 1, "rng": state["rng"],
           "skipped": skipped}
    aux = {**aux, "loss": loss, "grad_norm": gnorm, "lr": lr,
           "skipped_steps": skipped}
    return out, aux

  return train_step


@dataclasses.dataclass
class Compiled:
  """The functions of a run: ``init(batch) -> state`` (jitted, then the pretrained weights
  read into their shards), ``step(state, batch)`` (jitted)."""

  init: Any
  step: Any
  abstract_state: Any
  state_shardings: Any
  check_weights: Any  # () -> None: ConfigError unless every pretrained source fits


def compile_run(run: Run, example_batch: Any) -> Compiled:
  """jits init and the train step with shardings from the parameters' logical axes.

  The state is ``{params (trainable), frozen, opt_state (trainable only), extra, step, rng,
  skipped}``; ``model_params(state)`` merges the two parameter parts.
  """
  key = jax.random.PRNGKey(run.seed)
  init_rng, train_rng = jax.random.split(key)

  def boxed_init(batch):
    params, extra = run.task.init(init_rng, batch)
    trainable, frozen = split_params(params, run.is_frozen)
    return {"params": trainable, "frozen": frozen, "extra": extra}

  def init_fn(batch):
    parts = parallel.unbox(boxed_init(batch))
    return {**parts, "opt_state": run.tx.init(parts["params"]),
            "step": jnp.zeros((), jnp.int32), "rng": train_rng,
            "skipped": jnp.zeros((), jnp.int32)}

  names = parallel.logical_names(jax.eval_shape(boxed_init, example_batch))
  shapes = jax.eval_shape(init_fn, example_batch)
  shardings = parallel.state_shardings(shapes, names, run.rules, run.mesh)
  abstract = checkpoint.abstract_with_shardings(shapes, shardings)
  jit_init = jax.jit(init_fn, out_shardings=shardings)

  def check_weights():
    for src in run.weights:  # every file, key and shape is right, before compiling
      checkpoint.check_weights(src, _weight_targets(src, abstract))

  def init(batch):
    check_weights()
    return load_pretrained(jit_init(batch), run.weights)

  batch_sh = jax.tree.map(lambda _: parallel.batch_sharding(run.mesh), example_batch)
  jitted = jax.jit(make_train_step(run.task, run.tx, run.schedule, run.microbatches),
                   in_shardings=(shardings, batch_sh),
                   out_shardings=(shardings, parallel.replicated(run.mesh)),
                   donate_argnums=0 if run.runtime["donate"] else ())

  step = parallel.WithActivationRules(jitted, run.rules, run.mesh)
  return Compiled(init, step, abstract, shardings, check_weights)


def prepare(run: Run) -> tuple[Any, Any, Compiled]:
  """``(train data at its start, one global example batch, compile_run's functions)``: the
  shapes every state of ``run`` is built from (train loop, ``bigvl.eval``, tools)."""
  data = run.task.train_data(run.seed)
  start_state = data.get_state()
  example = parallel.global_batch(next(data), run.mesh)
  data.set_state(start_state)
  return data, example, compile_run(run, example)


def model_params(state: dict) -> dict:
  """The whole parameter tree of a train state (trainable and frozen leaves merged)."""
  return merge_params(state["params"], state["frozen"])


def _view_leaves(state: Any) -> dict[str, tuple[str, Any]]:
  """``{view path: (state path, leaf)}``: ``params/x`` for trainable and frozen leaves alike."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    p = parallel.path_str(path)
    out[checkpoint.view_path(p)] = (p, leaf)
  return out


def _weight_targets(src: checkpoint.WeightSource, abstract: Any) -> dict[str, Any]:
  """``{path below src.dst: ShapeDtypeStruct}`` of the state leaves ``src`` fills."""
  prefix = src.dst.rstrip("/") + "/"
  out = {p[len(prefix):]: leaf for p, (_, leaf) in _view_leaves(abstract).items()
         if p.startswith(prefix)}
  if not out:
    raise ConfigError(f"{src.what}: dst={src.dst!r} names no part of this run's state")
  return out


def load_pretrained(state: dict, sources: list[checkpoint.WeightSource]) -> dict:
  """``state`` (``{params, frozen?, extra, ...}`` of placed arrays) with the leaves each
  source names read from its file into the same shardings (host side, after a fresh init)."""
  for src in sources:
    targets = _weight_targets(src, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
    state = _put_weights(state, src.dst, checkpoint.read_weights(src, targets))
  return state


def _put_weights(state: Any, dst: str, arrays: dict[str, jax.Array]) -> Any:
  """``state`` with the leaves below ``dst`` (view paths) replaced by ``arrays``."""
  prefix = dst.rstrip("/") + "/"
  paths, treedef = jax.tree_util.tree_flatten_with_path(state)
  leaves = []
  for path, leaf in paths:
    rel = checkpoint.view_path(parallel.path_str(path))
    rel = rel[len(prefix):] if rel.startswith(prefix) else None
    leaves.append(arrays[rel] if rel in arrays else leaf)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _count_params(params: Any) -> float:
  """Millions of values."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) / 1e6


class _Preemption:
  """SIGTERM (a preempted TPU VM, ``kill``): checkpoint at the current step, then exit."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread
      self._old = None

  def _handler(self, signum, frame):
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _Profiler:
  """``jax.profiler`` traces of a few steps: from step ``start`` for ``steps`` steps (config),
  and for the next ``steps`` (3 if 0) steps after each SIGUSR1 (on request, while running).
  A trace ends after its last step's loss is ready, so it holds whole steps."""

  def __init__(self, directory: str, start: int, steps: int):
    self.directory, self.start, self.steps = directory, start, steps
    self.first = None  # the first step of the trace being taken
    self.until = None  # it stops once this many steps are done
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGUSR1, self._handler)
    except (ValueError, AttributeError):  # not the main thread / no SIGUSR1 here
      self._old = None

  def _handler(self, signum, frame):
    self.requested = True

  def before(self, step: int) -> None:
    """Starts a trace before step ``step`` (0-based) runs, if one is due."""
    if self.until is not None:
      return
    if self.steps and step == self.start:
      n = self.steps
    elif self.requested:
      n = self.steps or 3
    else:
      return
    self.requested = False
    jax.profiler.start_trace(self.directory)
    self.first, self.until = step, step + n

  def after(self, done: int, loss: Any) -> None:
    """Ends the trace once ``done`` steps are done and the last one's ``loss`` is ready."""
    if self.until is not None and done >= self.until:
      jax.block_until_ready(loss)
      self._stop(done)

  def _stop(self, done: int) -> None:
    jax.profiler.stop_trace()
    if jax.process_index() == 0:
      print(f"bigvl: profiled steps {self.first + 1}-{done} into {self.directory} "
            f"(TensorBoard's profile tab, xprof or Perfetto)", flush=True)
    self.first = self.until = None

  def close(self, done: int) -> None:
    """At the end of the loop: ends a trace still running, restores SIGUSR1."""
    if self.until is not None:
      self._stop(done)
    if self._old is not None:
      signal.signal(signal.SIGUSR1, self._old)
      self._old = None


def _write_curves(workdir: str) -> None:
  """``<workdir>/plots/training_curves.png`` (loss, lr, evaluations over steps), for users
  without TensorBoard; a failure to draw is a warning, never the run's error."""
  try:
    path = plots.write_training_curves(workdir)
    if path:
      print(f"bigvl: training curves in {path}", flush=True)
  except Exception as e:  # noqa: BLE001 -- the run's own outcome matters more than a plot
    logging.getLogger(__name__).warning("could not draw the training curves: %s: %s",
                                        type(e).__name__, e)


def train(config: ml_collections.ConfigDict, workdir: str, run: Run | None = None
          ) -> dict[str, float]:
  """Trains (or resumes) the experiment ``config`` in ``workdir``; returns the last eval."""
  run = run or build(config)
  task, mesh = run.task, run.mesh
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  data, example, fns = prepare(run)
  if not checkpoint.has_checkpoint(workdir):
    fns.check_weights()  # a bad pretrained source fails here, before anything is written
  ckpt = checkpoint.Checkpointer(workdir, keep=run.keep_ckpts,
                                 async_save=run.runtime["async_checkpoint"])
  restored = ckpt.restore_latest(fns.abstract_state)
  if restored is None:
    state = fns.init(example)
    step = 0
  else:
    step, state, data_state = restored
    if data_state:
      data.set_state(data_state)
    if jax.process_index() == 0:
      print(f"bigvl: resumed from step {step} ({ckpt.directory})", flush=True)
  train_step = fns.step.lower(state, example).compile()
  writer = metrics.MetricWriter(workdir, run.total_steps, task.examples_per_step,
                                step_flops=metrics.compiled_flops(train_step))
  if restored is not None:
    metrics.truncate_jsonl(writer.jsonl_path, step)
  del example
  if jax.process_index() == 0:
    print(f"bigvl: task={config.task} params={_count_params(model_params(state)):.2f}M "
          f"(trainable {_count_params(state['params']):.2f}M) "
          f"mesh={dict(mesh.shape)} devices={jax.device_count()} steps={run.total_steps} "
          f"batch={task.batch_size} workdir={workdir}", flush=True)

  preempt = _Preemption()
  profiler = _Profiler(os.path.join(workdir, "profile"), run.runtime["profile_start"],
                       run.runtime["profile_steps"])
  last_eval: dict[str, float] = {}

  def evaluate(step: int, state: dict, every_one: bool = False) -> None:
    for name, ev, every in run.evaluators:
      if not (every_one or step % every == 0 or step == run.total_steps):
        continue
      t0 = time.perf_counter()
      # evaluators that write files (generated captions) get the step and workdir
      out = {"step": step, "workdir": workdir} if getattr(ev, "writes_outputs", False) else {}
      res = ev.run(model_params(state), state["extra"], **out)
      res = {f"{name}/{k}": float(v) for k, v in res.items()}
      writer.write(step, res)
      last_eval.update(res)
      if jax.process_index() == 0:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items())
        print(f"bigvl: eval at step {step} ({time.perf_counter() - t0:.1f}s): {shown}",
              flush=True)

  if restored is None and run.eval_at_start:  # the starting point (a fine-tune's "before")
    evaluate(0, state, every_one=True)
  skipped_logged = int(jax.device_get(state["skipped"]))
  try:
    while step < run.total_steps:
      profiler.before(step)
      batch = parallel.global_batch(next(data), mesh)
      with jax.transfer_guard("disallow"):  # no hidden host<->device copies in the step
        state, aux = train_step(state, batch)
      step += 1
      profiler.after(step, aux["loss"])
      if not writer.started:
        jax.block_until_ready(aux["loss"])
        writer.start(step)
      if step % run.log_every == 0 or step == run.total_steps:
        scalars = {k: float(v) for k, v in jax.device_get(aux).items()}
        scalars.update(writer.compute_metrics(step))
        scalars["data_skipped"] = data.num_skipped
        skipped = int(scalars["skipped_steps"])
        if skipped > skipped_logged:
          print(f"bigvl: refused {skipped - skipped_logged} update(s) with a non-finite loss "
                f"or gradient up to step {step}", flush=True)
          if skipped - skipped_logged >= run.log_every:
            raise FloatingPointError(
                f"every step of the last {run.log_every} had a non-finite loss or gradient "
                f"(step {step}); stopping. The last good state is in {ckpt.directory}")
          skipped_logged = skipped
        writer.write(step, scalars)
        writer.progress(step, scalars, ("loss",) + task.progress_keys + ("grad_norm", "lr"))
      evaluate(step, state)
      if step % run.ckpt_every == 0 or step == run.total_steps or preempt.requested:
        ckpt.save(step, state, data.get_state())
      if preempt.requested:
        print(f"bigvl: SIGTERM: checkpointed step {step}, exiting", flush=True)
        break
  finally:
    profiler.close(step)
    preempt.restore()
    ckpt.close()
    writer.close()
    if jax.process_index() == 0:
      _write_curves(workdir)
  if jax.process_index() == 0 and last_eval:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump({"step": step, **last_eval}, f, indent=2)
  return last_eval

