"""Orbax checkpoints of the whole run: train state (params, optimizer state, task state, step,
rng) and the data iterator's state, so a resumed run continues exactly.

Restoring tries the newest step first; an unreadable one is reported with a warning and the
previous one is used. Nothing is ever unpickled: arrays go through orbax's tensorstore
format and the iterator state through JSON.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  def __init__(self, workdir: str, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                        enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=opts,
                                       item_names=("state", "data"))

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None) -> None:
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state or {})))

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """``(step, state, data_state)`` from the newest readable checkpoint, or None.

    ``abstract_state``: ShapeDtypeStructs with shardings (``jax.eval_shape`` + shardings);
    the restored arrays come back sharded as they say.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return step, out["state"], dict(out["data"] or {})
      except Exception as e:  # noqa: BLE001 -- any failure: fall back to the previous step
        log.warning("checkpoint at step %d under %s is unreadable (%s: %s); trying the "
                    "previous one", step, self.directory, type(e).__name__,
                    str(e).splitlines()[0][:200] if str(e) else "")
    if steps:
      log.warning("no readable checkpoint under %s: starting from scratch", self.directory)
    return None

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
