"""Evaluate a trained run, or a converted public checkpoint, without training it.

  python -m bigvl.eval --config configs/x.py:arg --workdir W [--step N] [--out DIR]
                       [--config.key=value ...]

The run is built exactly as ``bigvl.main`` builds it (the same config checks: a bad config
exits with status 2 and one line before anything compiles). Its state is the workdir's
newest readable checkpoint (``--step N``: that step's) or, when ``W`` holds no checkpoint, the
fresh init with ``config.init_from`` read in (a public checkpoint converted by
``bigvl.convert``). Every evaluator of ``config.evals`` runs once; ``DIR`` (default
``W/eval``) receives ``results.json`` (``{"step": N, "<eval>/<metric>": value, ...}``, the
same keys as the train loop's ``results.json``) and PNGs: ``training_curves.png`` from
``W/metrics.jsonl`` and each evaluator's figures, ``<eval>_<figure>.png`` (retrieval:
gallery and similarity heatmap; zero-shot and classification: confusion matrix;
segmentation: overlays and pixel confusion). ``notebooks/evaluate.ipynb`` calls these same
functions (:func:`load`, :func:`evaluate`, :func:`figures`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import ml_collections

from bigvl import checkpoint, plots, train
from bigvl.config import ConfigError


@dataclasses.dataclass
class Loaded:
  """A built run with its state: ``params`` (trainable and frozen merged), ``extra`` (the
  task's state, e.g. an EMA teacher), the checkpoint's ``step`` (0: a fresh init)."""

  run: train.Run
  state: dict
  step: int
  workdir: str

  @property
  def params(self) -> Any:
    return train.model_params(self.state)

  @property
  def extra(self) -> Any:
    return self.state["extra"]

  @property
  def evaluator_names(self) -> list[str]:
    return [name for name, _, _ in self.run.evaluators]


def load(config: ml_collections.ConfigDict, workdir: str, step: int | None = None
         ) -> Loaded:
  """Builds ``config``'s run and its state from ``workdir`` (see the module docstring).
  ConfigError: a tool config, an absent ``step``, no checkpoint and no weights to read."""
  run = train.build(config)
  if run.tool is not None:
    raise ConfigError(f"config.tool={config.tool!r}: bigvl.eval evaluates a trained model, "
                      "not a tool")
  if not checkpoint.has_checkpoint(workdir):  # fail before anything compiles
    if step is not None:
      raise ConfigError(f"--step {step}: {workdir} holds no checkpoints")
    if not run.weights:
      raise ConfigError(f"{workdir} holds no checkpoint and the config reads no weights "
                        "(config.init_from): nothing trained to evaluate")
  _, example, fns = train.prepare(run)
  if checkpoint.has_checkpoint(workdir):
    ckpt = checkpoint.Checkpointer(workdir, keep=run.keep_ckpts, async_save=False)
    try:
      steps = ckpt.all_steps()
      if step is not None and step not in steps:
        raise ConfigError(f"--step {step}: {ckpt.directory} holds steps "
                          f"{', '.join(map(str, steps))}")
      restored = ckpt.restore_latest(fns.abstract_state, max_step=step)
    finally:
      ckpt.close()
    if restored is None or (step is not None and restored[0] != step):
      raise ConfigError(f"no readable checkpoint{f' at step {step}' if step else ''} under "
                        f"{ckpt.directory}")
    return Loaded(run, restored[1], restored[0], workdir)
  return Loaded(run, fns.init(example), 0, workdir)


def _selected(loaded: Loaded, names: list[str] | None) -> list[tuple[str, Any]]:
  chosen = [(n, ev) for n, ev, _ in loaded.run.evaluators if names is None or n in names]
  unknown = set(names or ()) - {n for n, _ in chosen}
  if unknown:
    raise ConfigError(f"no evaluator named {', '.join(sorted(unknown))}; config.evals has "
                      f"{', '.join(loaded.evaluator_names) or 'none'}")
  return chosen


def evaluate(loaded: Loaded, names: list[str] | None = None, out_dir: str | None = None,
             verbose: bool = True) -> dict[str, float]:
  """``{'<eval>/<metric>': value}`` of the evaluators ``names`` (default: all). Evaluators
  that write files (segmentation overlays, generated captions) write them under
  ``out_dir`` (default: none written)."""
  results: dict[str, float] = {}
  for name, ev in _selected(loaded, names):
    t0 = time.perf_counter()
    kwargs = {}
    if getattr(ev, "writes_outputs", False) and out_dir is not None:
      kwargs = {"step": loaded.step, "workdir": out_dir}
    res = {f"{name}/{k}": float(v) for k, v in ev.run(loaded.params, loaded.extra,
                                                       **kwargs).items()}
    results.update(res)
    if verbose and jax.process_index() == 0:
      shown = ", ".join(f"{k} {v:.4f}" for k, v in res.items())
      print(f"bigvl.eval: {name} ({time.perf_counter() - t0:.1f}s): {shown}", flush=True)
  return results


def figures(loaded: Loaded, names: list[str] | None = None, curves: bool = True
            ) -> dict[str, Any]:
  """``{'training_curves': Figure, '<eval>/<figure>': Figure}``: the curves of
  ``metrics.jsonl`` (when the workdir has one) and the figures of every selected evaluator
  that draws (``Evaluator.figures(params, state)``)."""
  from bigvl import metrics

  out: dict[str, Any] = {}
  path = os.path.join(loaded.workdir, "metrics.jsonl")
  if curves and os.path.exists(path):
    fig = plots.training_curves(metrics.read_jsonl(path))
    if fig is not None:
      out["training_curves"] = fig
  for name, ev in _selected(loaded, names):
    if hasattr(ev, "figures"):
      for k, fig in ev.figures(loaded.params, loaded.extra).items():
        out[f"{name}/{k}"] = fig
  return out


def save(out_dir: str, step: int, results: dict[str, float], figs: dict[str, Any]
         ) -> dict[str, str]:
  """``out_dir/results.json`` (``{"step": step, **results}``) and ``out_dir/<name>.png``
  per figure (``/`` -> ``_``), written atomically by process 0; returns ``{name: path}``."""
  if jax.process_index() != 0:
    return {}
  os.makedirs(out_dir, exist_ok=True)
  tmp = os.path.join(out_dir, "results.json.tmp")
  with open(tmp, "w") as f:
    json.dump({"step": step, **results}, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, "results.json"))
  return {name: plots.save(fig, os.path.join(out_dir, name.replace("/", "_") + ".png"))
          for name, fig in figs.items()}


def write(loaded: Loaded, out_dir: str, names: list[str] | None = None) -> dict[str, Any]:
  """:func:`evaluate` + :func:`figures` + :func:`save` (the results first: a figure that
  fails loses no numbers); returns ``{'results': ..., 'figures': {name: path}}``."""
  results = evaluate(loaded, names, out_dir=out_dir)
  save(out_dir, loaded.step, results, {})
  return {"results": results,
          "figures": save(out_dir, loaded.step, results, figures(loaded, names))}


def load_from(config: str, workdir: str, overrides: list[str] | tuple = (),
              step: int | None = None) -> Loaded:
  """:func:`load` from a config spec as on the command line (``configs/x.py:arg`` and
  ``--config.key=value`` overrides), with the command line's checks: a bad config prints one
  line and raises ``SystemExit(2)``."""
  from bigvl import main as cli

  fv = cli._parse(["bigvl.eval", "--config", config, "--workdir", workdir, *overrides])
  try:
    return load(fv.config, workdir, step)
  except ConfigError as e:
    cli._fail(str(e))


def main(argv: list[str] | None = None) -> None:
  from bigvl import main as cli

  def extra_flags(flags: Any, fv: Any) -> None:
    flags.DEFINE_integer("step", None, "evaluate this checkpoint step (default: the newest)",
                         flag_values=fv)
    flags.DEFINE_string("out", None, "where results.json and the PNGs go (default W/eval)",
                        flag_values=fv)
    flags.DEFINE_list("evals", None, "only these evaluators of config.evals", flag_values=fv)

  fv = cli._parse(list(sys.argv if argv is None else argv), extra_flags=extra_flags)
  cli.ensure_host_heap(fv.config, argv)
  cli.quiet_logging(fv.log_level)
  from bigvl import parallel

  parallel.initialize_distributed()
  try:
    loaded = load(fv.config, fv.workdir, fv.step)
    out_dir = fv.out or os.path.join(fv.workdir, "eval")
    if jax.process_index() == 0:
      what = f"step {loaded.step}" if loaded.step else "the fresh init + config.init_from"
      print(f"bigvl.eval: {fv.workdir} at {what}; evaluators: "
            f"{', '.join(loaded.evaluator_names) or 'none'}", flush=True)
    out = write(loaded, out_dir, fv.evals)
  except ConfigError as e:
    cli._fail(str(e))
  if jax.process_index() == 0:
    print(f"bigvl.eval: wrote {os.path.join(out_dir, 'results.json')} and "
          f"{len(out['figures'])} figures: {', '.join(sorted(out['figures']))}", flush=True)


if __name__ == "__main__":
  main()
