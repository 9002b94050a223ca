"""The LVLM captioning task: the masked next-token loss, the LLaVA stages' trainable parts
(frozen parameters bit-identical), LoRA-only training, and the 8-device sharded step."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from bigvl import parallel, train
from bigvl.config import load_sibling
from bigvl.tasks.lvlm_caption import next_token_loss
from tests.helpers import REPO, grads_and_losses


def lvlm_config(data_dir: str, arg: str = "tiny", **overrides):
  c = load_sibling(os.path.join(REPO, "configs", "x.py"), "lvlm_shapes").get_config(arg)
  c.update_from_flattened_dict({"input.data_dir": data_dir,
                                "input.dataset": "shapes_captions/small",
                                "input.batch_size": 8, "input.seq_len": 64,
                                "input.num_threads": 1,
                                "total_steps": 4, "schedule.warmup_steps": 1, **overrides})
  c.evals = {}
  return c


def compiled(config, devices):
  run = train.build(config, devices=devices)
  data = run.task.train_data(run.seed)
  batch = parallel.global_batch(next(data), run.mesh)
  fns = train.compile_run(run, batch)
  return run, fns, fns.init(batch), data


def test_next_token_loss_against_a_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 6))
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]])
  loss, m = next_token_loss(logits, tokens, mask)
  nll, n, hits = 0.0, 0, 0
  for b in range(2):
    for t in range(5):
      if mask[b, t + 1]:
        lp = logits[b, t] - np.log(np.exp(logits[b, t]).sum())
        nll -= lp[tokens[b, t + 1]]
        hits += int(np.argmax(lp) == tokens[b, t + 1])
        n += 1
  assert float(loss) == pytest.approx(nll / n, rel=1e-5)
  assert float(m["token_acc"]) == pytest.approx(hits / n)
  assert float(m["answer_tokens"]) == n


def _changed(a, b):
  return jax.tree.map(lambda x, y: not np.array_equal(x, y), a, b)


@pytest.mark.parametrize("arg,trained,soft", [
    ("tiny,stage=2,lora=True", r"^projector/|lora_[ab]$", 0),
    ("tiny", r"^projector/", 0),  # stage 1's regex, set by hand: no init_from to read here
    ("tiny", r"^projector/|soft_prompts_", 4),  # soft prompt vectors spliced by the template
])
def test_only_the_named_parts_train_and_the_rest_stays_bit_identical(shapes_data_dir, arg,
                                                                      trained, soft):
  c = lvlm_config(shapes_data_dir, arg, **{"model.trainable": trained, "mesh.data": 1,
                                           "model.soft_prompt_tokens": soft})
  c.init_from = {}
  run, fns, state, data = compiled(c, jax.devices()[:1])
  paths = [parallel.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state["params"])]
  assert paths and all(p.startswith("projector/") or p.endswith(("lora_a", "lora_b"))
                       or "soft_prompts_" in p for p in paths)
  assert any("soft_prompts_" in p for p in paths) == bool(soft)
  if "lora" in arg:
    assert any(p.endswith("lora_a") for p in paths)
  frozen0, params0 = parallel.to_host(state["frozen"]), parallel.to_host(state["params"])
  for _ in range(3):
    state, _ = fns.step(state, parallel.global_batch(next(data), run.mesh))
  jax.tree.map(np.testing.assert_array_equal, parallel.to_host(state["frozen"]), frozen0)
  moved = _changed(parallel.to_host(state["params"]), params0)
  assert all(jax.tree.leaves(moved)), moved


def test_sharded_step_equals_the_one_device_step(shapes_data_dir):
  """data x fsdp x tensor = 2 x 2 x 2 against 1 device: the same losses over 3 steps and the
  same gradients. (Parameters after Adam steps are not compared elementwise: Adam's
  normalisation turns reduction-order noise in ~0 gradients into O(lr) differences.)"""
  results = []
  for mesh, devices in (({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]),
                        ({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])):
    c = lvlm_config(shapes_data_dir, "tiny", **{f"mesh.{k}": v for k, v in mesh.items()})
    run, fns, state, data = compiled(c, devices)
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state["params"])}
    batch = parallel.global_batch(next(data), run.mesh)
    grads, losses, _ = grads_and_losses(run, fns, state, batch, data)
    results.append((losses, grads, specs))
  (l1, g1, _), (l8, g8, specs8) = results
  assert any("tensor" in s for s in specs8) and any("fsdp" in s for s in specs8)
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(g1))  # some leaves' grads are ~1e-11
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale),
               g8, g1)


def test_a_public_lm_directory_initialises_the_lvlm_decoder(shapes_data_dir, tmp_path):
  """``init_from.lm = {path: <config.json + safetensors dir>, dst: 'params/lm'}``: after a
  fresh init the decoder holds the checkpoint's weights (converted layouts), the rest not."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
      rms_norm_eps=1e-6))
  hf.save_pretrained(str(tmp_path), safe_serialization=True)
  c = lvlm_config(shapes_data_dir, "tiny", **{"mesh.data": 2, "mesh.fsdp": 2,
                                              "mesh.tensor": 2, "model.lm.vocab_size": 128})
  c.init_from = {"lm": {"path": str(tmp_path), "dst": "params/lm"}}
  _, _, state, _ = compiled(c, jax.devices()[:8])
  lm = parallel.to_host(state["params"]["lm"])
  sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  np.testing.assert_array_equal(lm["embed"]["embedding"], sd["model.embed_tokens.weight"])
  q1 = sd["model.layers.1.self_attn.q_proj.weight"]  # [heads * head_dim, width]
  np.testing.assert_array_equal(lm["layers"]["attn"]["q"]["kernel"][1],
                                q1.T.reshape(64, 4, 16))
  np.testing.assert_array_equal(lm["layers"]["mlp"]["down"]["kernel"][0],
                                sd["model.layers.0.mlp.down_proj.weight"].T)
