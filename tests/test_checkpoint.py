"""Checkpointer: keep-k pruning, restore of the newest step (state and data state), on disk
and across a fresh Checkpointer (a restarted process)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import checkpoint


def _tree(step):
  return {"w": jnp.full((3, 2), float(step)), "step": jnp.int32(step),
          "nested": {"b": jnp.arange(4.0) * step}}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _step_dirs(directory):
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.mark.parametrize("keep", [1, 2, 3])
@pytest.mark.parametrize("async_save", [True, False])
def test_keep_k_prunes_to_the_newest_k(tmp_path, keep, async_save):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=keep, async_save=async_save)
  for step in range(1, 6):
    ckpt.save(step, _tree(step), {"next_index": 10 * step})
  ckpt.wait()
  want = list(range(6 - keep, 6))
  assert ckpt.all_steps() == want
  assert _step_dirs(ckpt.directory) == want  # pruned on disk, not only in the index
  step, state, data = ckpt.restore_latest(_abstract(_tree(0)))
  assert step == 5 and data == {"next_index": 50}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(5))
  ckpt.close()

  # A new process sees the same: the newest k steps, the newest restored.
  fresh = checkpoint.Checkpointer(str(tmp_path), keep=keep)
  assert fresh.all_steps() == want
  step, state, data = fresh.restore_latest(_abstract(_tree(0)))
  assert step == 5 and data == {"next_index": 50}
  jax.tree.map(np.testing.assert_array_equal, state, _tree(5))
  # Saving on after a restart keeps pruning the oldest.
  fresh.save(6, _tree(6), {"next_index": 60})
  fresh.wait()
  assert fresh.all_steps() == list(range(7 - keep, 7))
  assert _step_dirs(fresh.directory) == list(range(7 - keep, 7))
  fresh.close()


def test_restore_latest_on_an_empty_directory_is_none(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.all_steps() == [] and ckpt.restore_latest(_abstract(_tree(0))) is None
  ckpt.close()
