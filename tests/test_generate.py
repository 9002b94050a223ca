"""bigvl.generate: greedy equals a step-by-step argmax of the full forward, sampling filters,
one compile per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import generate as gen
from bigvl.models import llm
from bigvl.parallel import unbox


@pytest.fixture(scope="module")
def lm():
  model = llm.LLM(llm.LLMConfig(vocab_size=61, width=32, depth=2, num_heads=4, num_kv_heads=1,
                                head_dim=8, mlp_dim=64, tie_embeddings=True))
  return model, unbox(model.init(jax.random.key(7), jnp.zeros((1, 3), jnp.int32))["params"])


def naive_greedy(model, params, prompt, n):
  """Step-by-step argmax of the full forward (no cache). The LM is causal, so the logits at
  position ``t`` of a row padded at the end are those of the unpadded prefix: one fixed-shape
  jitted forward serves every step."""
  total = len(prompt) + n
  forward = jax.jit(lambda toks: model.apply({"params": params}, toks))
  seq = list(prompt)
  for _ in range(n):
    row = jnp.array([seq + [0] * (total - len(seq))])
    seq.append(int(forward(row)[0, len(seq) - 1].argmax()))
  return seq[len(prompt):]


def test_greedy_batch_of_different_lengths_equals_each_prompt_alone(lm):
  model, params = lm
  prompts = [[3, 5, 7], [9, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32], [1]]
  out = gen.generate(model, params, prompts, 7)
  assert out.shape == (3, 7) and out.dtype == np.int32
  for p, o in zip(prompts, out, strict=True):
    assert o.tolist() == naive_greedy(model, params, p, 7)


def test_compiles_once_per_shape_not_per_token(lm, monkeypatch):
  model, params = lm
  monkeypatch.setattr(gen, "_PROGRAMS", {})  # other tests in this process may share the key
  before = gen.compilations()
  gen.generate(model, params, [[1, 2], [3]], 9)
  gen.generate(model, params, [[4, 5, 6], [7, 8]], 9)  # same bucket and batch: no compile
  assert gen.compilations() - before == 2  # one prefill + one decode program


def test_eos_ends_a_row_with_padding(lm):
  model, params = lm
  ref = gen.generate(model, params, [[3, 5, 7]], 6)[0]
  eos = int(ref[2])
  out = gen.generate(model, params, [[3, 5, 7]], 6, eos_id=eos, pad_id=0)[0]
  first = ref.tolist().index(eos)
  assert out[: first + 1].tolist() == ref[: first + 1].tolist()
  assert (out[first + 1:] == 0).all()


def test_top_k_1_and_tiny_top_p_are_greedy(lm):
  model, params = lm
  greedy = gen.generate(model, params, [[3, 5], [8]], 5)
  for kw in ({"top_k": 1}, {"top_p": 1e-6}):
    out = gen.generate(model, params, [[3, 5], [8]], 5, temperature=1.3,
                       rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(out, greedy)


def test_sampling_follows_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 20000)
  draw = jax.vmap(lambda k, **kw: gen.sample_logits(logits, k, 1.0, **kw)[0])
  freq = np.bincount(np.asarray(draw(keys)), minlength=4) / len(keys)
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
  # top-p 0.7: keep the smallest set reaching 0.7 -> {0, 1}, renormalised 5/8, 3/8
  freq = np.bincount(np.asarray(jax.vmap(
      lambda k: gen.sample_logits(logits, k, 1.0, top_p=0.7)[0])(keys)), minlength=4) / 20000
  np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.015)
  freq = np.bincount(np.asarray(jax.vmap(
      lambda k: gen.sample_logits(logits, k, 1.0, top_k=3)[0])(keys)), minlength=4) / 20000
  np.testing.assert_allclose(freq, np.array([0.5, 0.3, 0.15, 0]) / 0.95, atol=0.015)


def test_bad_arguments_are_refused(lm):
  model, params = lm
  with pytest.raises(ValueError, match="rng"):
    gen.generate(model, params, [[1]], 3, temperature=0.7)
  with pytest.raises(ValueError, match="empty"):
    gen.generate(model, params, [[1], []], 3)


def test_sharded_parameters_generate_the_same_tokens(lm):
  """Parameters sharded by their logical names over fsdp x tensor = 4 x 2: same tokens."""
  from bigvl import parallel

  model, params = lm
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  boxed = jax.eval_shape(model.init, jax.random.key(7), jnp.zeros((1, 3), jnp.int32))
  names = parallel.logical_names(boxed["params"])
  rules = parallel.check_logical_rules(None)

  def place(path, x):
    spec = parallel.logical_to_spec(names[parallel.path_str(path)], x.shape, rules, mesh)
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

  sharded = jax.tree_util.tree_map_with_path(place, params)
  assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(sharded))
  prompts = [[3, 5, 7], [9, 2, 4, 6], [1], [8, 8]]
  np.testing.assert_array_equal(gen.generate(model, sharded, prompts, 6),
                                gen.generate(model, params, prompts, 6))
