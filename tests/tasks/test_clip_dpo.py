"""CLIP-DPO's DPO task: with the policy equal to its reference the loss is log 2 and the
rewards 0; the three reference modes agree where they must; rows mask the answers only."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

from bigvl import parallel, train
from bigvl.config import ConfigError, load_sibling
from bigvl.tasks import clip_dpo
from tests.helpers import REPO, grads_and_losses


@pytest.fixture(scope="module")
def cooc_dir(shapes_data_dir):
  from bigvl.data import sources

  sources.get_source("shapes_captions/cooc_small", "train", shapes_data_dir)
  return shapes_data_dir


def write_prefs(path: str, n: int = 12) -> str:
  rows = []
  for i in range(n):
    rows.append({"chosen": "two shapes . a red circle at the top .",
                 "rejected": "three shapes . a red circle at the top . a green square .",
                 "chosen_score": 20.0, "rejected_score": 15.0, "chosen_source": "sample",
                 "rejected_source": "sample", "image_index": i,
                 "question": "description" if i % 2 else "is there a red circle in the image ?",
                 "kind": "caption", "chosen_ref_logp": -3.0 - i, "rejected_ref_logp": -5.0})
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def dpo_config(data_dir: str, prefs: str, reference: str = "frozen", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "clip_dpo_shapes").get_config(
      f"tiny,stage=dpo,reference={reference},sft=/nonexistent,preferences={prefs}")
  c.update_from_flattened_dict({"input.data_dir": data_dir,
                                "input.dataset": "shapes_captions/cooc_small",
                                "input.batch_size": 4, "input.num_threads": 1,
                                "input.seq_len": 64, "mesh.data": 1, "total_steps": 2,
                                **overrides})
  c.evals = {}
  c.init_from = {}
  c.eval_at_start = False
  return c


def built(cfg):
  run = train.build(cfg, devices=jax.devices()[:1])
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  state = fns.init(batch) if not run.weights else None
  return run, fns, batch, state


def test_rows_mask_only_the_answers(cooc_dir, tmp_path):
  cfg = dpo_config(cooc_dir, write_prefs(str(tmp_path / "p.jsonl")), "adapters_off")
  run = train.build(cfg, devices=jax.devices()[:1])
  task = run.task
  ex = task.pairs[1]
  row = task.pair_rows(ex, np.random.default_rng(0))
  assert row["tokens"].shape == row["loss_mask"].shape == (2, 64)
  for k, key in enumerate(("chosen", "rejected")):
    answer = task.chat.answer_ids(ex[key])
    prompt = task.chat.prompt_ids(ex["question"])
    m = row["loss_mask"][k]
    assert m.sum() == len(answer)
    np.testing.assert_array_equal(row["tokens"][k][m == 1], answer)
    assert m[:len(prompt)].sum() == 0
  np.testing.assert_allclose(row["ref_logps"], [-4.0, -5.0])


@pytest.mark.parametrize("reference", ["adapters_off", "precomputed"])
def test_policy_equal_to_reference_gives_log2(cooc_dir, tmp_path, reference):
  """LoRA's B starts at 0: the policy is the reference. With 'adapters_off' the loss is
  exactly log 2 and the rewards 0; 'precomputed' reads the file's reference log-probs."""
  cfg = dpo_config(cooc_dir, write_prefs(str(tmp_path / "p.jsonl")), reference)
  run, _, batch, state = built(cfg)
  params = train.model_params(state)
  # (jitted: one compiled program, not a dispatch of every op)
  loss, (m, _) = jax.jit(lambda p: run.task.loss(p, {}, batch, jax.random.key(0), 0))(params)
  # the config adds the chosen answers' NLL per token (RPO) with weight sft_weight
  policy, counts = jax.jit(lambda p: run.task._logps(p, batch, None))(params["policy"])
  nll = -float(np.sum(policy[:, 0])) / float(np.sum(counts[:, 0]))
  assert float(m["sft_nll"]) == pytest.approx(nll, rel=1e-5)
  assert float(loss) == pytest.approx(float(m["dpo_loss"]) + run.task.sft_weight * nll,
                                      rel=1e-5)
  loss = m["dpo_loss"]
  if reference == "adapters_off":
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(m["rewards/margin"]) == pytest.approx(0.0, abs=1e-6)
  else:
    ref = np.asarray(batch["ref_logps"])
    h = (np.asarray(policy[:, 0]) - ref[:, 0]) - (np.asarray(policy[:, 1]) - ref[:, 1])
    want = np.mean(np.logaddexp(0.0, -0.1 * h))  # -log sigmoid(beta h)
    assert float(loss) == pytest.approx(want, rel=1e-5)


def test_adapters_off_is_the_frozen_copy(cooc_dir, tmp_path):
  """With trained (non-zero) adapters, 'adapters_off' scores exactly as a frozen copy of the
  base weights, and the policy differs from both."""
  cfg = dpo_config(cooc_dir, write_prefs(str(tmp_path / "p.jsonl")), "adapters_off")
  run, _, batch, state = built(cfg)
  params = train.model_params(state)
  rng = np.random.default_rng(0)
  moved = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
      if "lora_b" in jax.tree_util.keystr(p) else x, params["policy"])
  logps = jax.jit(lambda p: run.task._logps(p, batch, None)[0])
  off = logps(clip_dpo.adapters_off(moved))
  base = logps(params["policy"])  # B = 0: the base model
  on = logps(moved)
  np.testing.assert_allclose(off, base, rtol=1e-6, atol=1e-5)
  assert np.abs(np.asarray(on) - np.asarray(base)).max() > 1e-3


def test_only_policy_adapters_train(cooc_dir, tmp_path):
  cfg = dpo_config(cooc_dir, write_prefs(str(tmp_path / "p.jsonl")), "adapters_off")
  run = train.build(cfg, devices=jax.devices()[:1])
  assert run.task.trainable("policy/lm/layers/attn/q/lora_a")
  assert not run.task.trainable("policy/lm/layers/attn/q/kernel")
  assert not run.task.trainable("ref/lm/layers/attn/q/lora_a")


def test_bad_dpo_configs(cooc_dir, tmp_path):
  prefs = write_prefs(str(tmp_path / "p.jsonl"))
  one = jax.devices()[:1]
  with pytest.raises(ConfigError, match="reference_path"):
    train.build(dpo_config(cooc_dir, prefs, "frozen", **{"dpo.reference_path": ""}), devices=one)
  with pytest.raises(ConfigError, match="beta"):
    train.build(dpo_config(cooc_dir, prefs, "adapters_off", **{"dpo.beta": -1.0}), devices=one)
  with pytest.raises(ConfigError, match="no preference file"):
    train.build(dpo_config(cooc_dir, str(tmp_path / "missing.jsonl"), "adapters_off"), devices=one)
  with pytest.raises(ConfigError, match="LoRA"):
    train.build(dpo_config(cooc_dir, prefs, "adapters_off", **{"model.lora.rank": 0}), devices=one)


def test_sharded_dpo_step_equals_the_one_device_step(cooc_dir, tmp_path):
  """A frozen reference copy and LoRA policy on data x fsdp x tensor = 2 x 2 x 2 against 1
  device: the same losses over 3 steps and the same gradients."""
  prefs = write_prefs(str(tmp_path / "p.jsonl"), n=32)
  results = []
  for mesh, devices in (({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                        ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])):
    cfg = dpo_config(cooc_dir, prefs, "adapters_off",
                     **{f"mesh.{k}": v for k, v in mesh.items()}, **{"input.batch_size": 8})
    cfg.dpo.reference = "frozen"  # its path is not read: the copy keeps the init, = policy
    cfg.dpo.reference_path = "/unused"
    run = train.build(cfg, devices=devices)
    data = run.task.train_data(run.seed)
    batch = parallel.global_batch(next(data), run.mesh)
    fns = train.compile_run(run, batch)
    run.weights.clear()  # the reference starts as the policy's init (no file in this test)
    grads, losses, state = grads_and_losses(run, fns, fns.init(batch), batch, data)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["frozen"])}
    results.append((losses, grads, specs))
  (l1, g1, _), (l8, g8, specs8) = results
  assert any("fsdp" in s for s in specs8)  # the frozen reference is sharded too
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(g1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
               g8, g1)
