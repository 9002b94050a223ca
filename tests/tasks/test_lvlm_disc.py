"""VladVA (lvlm_disc): the embedding is the last real token's hidden state whatever the
padding; only soft prompts, LoRA adapters and the temperature train. The tiny config's
end-to-end run (from a captioner's workdir) is docs/vladva.md's runnable block
(tests/test_docs_commands.py checks its evaluations)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import parallel, train
from bigvl.config import load_sibling
from bigvl.tasks.lvlm_disc import last_token
from tests.helpers import REPO


def vladva_config(data_dir: str, arg: str = "tiny", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "vladva_shapes").get_config(arg)
  c.update_from_flattened_dict({"input.data_dir": data_dir,
                                "input.dataset": "shapes_captions/small",
                                "input.batch_size": 8, "input.num_threads": 1,
                                "mesh.data": 1, "total_steps": 4,
                                "schedule.warmup_steps": 1, **overrides})
  c.evals = {}
  c.init_from = {}
  return c


@pytest.fixture(scope="module")
def built(shapes_data_dir):
  run = train.build(vladva_config(shapes_data_dir), devices=jax.devices()[:1])
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  return run, fns, fns.init(batch), data


def test_last_token_picks_the_last_valid_position():
  h = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], bool)
  np.testing.assert_array_equal(last_token(h, mask), jnp.stack([h[0, 2], h[1, 4]]))


def test_text_embedding_ignores_padding_layout_and_length(built):
  """Right-padded, left-padded and unpadded rows of different lengths embed the same."""
  run, _, state, _ = built
  task, params = run.task, train.model_params(state)
  texts = ["a red circle", "a blue square left of a green star and a white circle"]
  right = task.encode_texts(texts)["tokens"]
  pad = task.tokenizer.pad_id
  left = np.stack([np.concatenate([np.full((r == pad).sum(), pad), r[r != pad]])
                   for r in right]).astype(np.int32)
  assert (left[:, -1] != pad).all() and (right[:, -1] == pad).all()
  embed = jax.jit(lambda p, t: task.model.apply({"params": p}, t, method="embed_texts"))
  z_right, z_left = embed(params, right), embed(params, left)
  np.testing.assert_allclose(z_left, z_right, atol=1e-5)
  for i, r in enumerate(right):  # each text alone, no padding at all
    alone = embed(params, r[r != pad][None])
    np.testing.assert_allclose(alone[0], z_right[i], atol=1e-5)
  assert np.abs(z_right[0] - z_right[1]).max() > 1e-3


def test_only_soft_prompts_lora_and_temperature_train(built):
  run, fns, state, data = built
  paths = [parallel.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state["params"])]
  assert {"t", "b"} <= set(paths)
  assert all(p.endswith(("lora_a", "lora_b")) or "soft_prompts_" in p or p in ("t", "b")
             for p in paths), paths
  assert any("soft_prompts_0" in p for p in paths) and any("soft_prompts_1" in p for p in paths)
  frozen0, params0 = parallel.to_host(state["frozen"]), parallel.to_host(state["params"])
  for _ in range(3):
    state, aux = fns.step(state, parallel.global_batch(next(data), run.mesh))
  assert np.isfinite(float(aux["contrastive"])) and float(aux["ntp"]) > 0
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(state["frozen"]), frozen0)
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       parallel.to_host(state["params"]), params0)
  assert not moved.pop("b")  # the softmax (InfoNCE) loss has no bias; SigLIP's would move it
  assert all(jax.tree.leaves(moved)), moved
