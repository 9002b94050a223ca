"""The decoder LM: KV-cache decoding equals the full forward, LoRA and soft prompts, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigvl import generate as gen
from bigvl.models import llm, lora
from bigvl.models.soft_prompt import SoftPromptSpec
from bigvl.parallel import unbox

CFG = llm.LLMConfig(vocab_size=97, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
                    mlp_dim=48, rope_theta=500.0, qkv_bias=True)


def init(config: llm.LLMConfig, seed: int = 0):
  model = llm.LLM(config)
  params = unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  # random (not zero) biases and LoRA B so that every term is exercised
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  out = [x + 0.05 * jax.random.normal(k, x.shape) if "bias" in str(p) or "lora_b" in str(p)
         else x for (p, x), k in zip(leaves, keys, strict=True)]
  return model, jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture(scope="module")
def lm():
  return init(CFG)


def test_cache_decode_equals_full_forward_for_left_padded_prompts_of_different_lengths(lm):
  model, params = lm
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 97, n).tolist() for n in (3, 9, 6)]
  conts = [rng.integers(1, 97, 5).tolist() for _ in prompts]
  ids, mask = gen.left_pad(prompts, bucket=4)
  b, p = ids.shape
  cache = model.init_cache(b, p + 5)
  key_valid = jnp.concatenate([mask, jnp.ones((b, 5), bool)], axis=1)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  logits, cache = model.apply({"params": params}, ids, positions=positions,
                              attention_mask=key_valid, cache=cache, cache_index=0)
  steps = [logits[:, -1]]
  for t in range(5):
    tok = jnp.array([c[t] for c in conts])[:, None]
    logits, cache = model.apply({"params": params}, tok, positions=positions[:, -1:] + 1 + t,
                                attention_mask=key_valid, cache=cache, cache_index=p + t)
    steps.append(logits[:, -1])
  for i, (pr, co) in enumerate(zip(prompts, conts, strict=True)):
    alone = model.apply({"params": params}, jnp.array([pr + co]))[0]
    want = alone[len(pr) - 1:]  # the logits after the prompt and after each continuation token
    got = jnp.stack([s[i] for s in steps])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_packed_segments_equal_separate_sequences(lm):
  model, params = lm
  a, b = [5, 6, 7, 8], [9, 10, 11]
  ids = jnp.array([a + b + [0]])
  seg = jnp.array([[1] * 4 + [2] * 3 + [0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  packed = model.apply({"params": params}, ids, segment_ids=seg, positions=pos)[0]
  np.testing.assert_allclose(packed[:4], model.apply({"params": params}, jnp.array([a]))[0],
                             atol=2e-5)
  np.testing.assert_allclose(packed[4:7], model.apply({"params": params}, jnp.array([b]))[0],
                             atol=2e-5)


def test_remat_policies_give_the_same_loss_and_gradients():
  ids = jax.random.randint(jax.random.key(3), (2, 12), 0, 97)
  ref = None
  for policy in ("none", "full", "dots"):
    model = llm.LLM(llm.LLMConfig(**{**CFG.__dict__, "remat": policy}))
    params = unbox(model.init(jax.random.key(0), ids)["params"])

    def loss(p, model=model):
      return jax.nn.log_softmax(model.apply({"params": p}, ids)).mean()

    val, grads = jax.jit(jax.value_and_grad(loss))(params)
    if ref is None:
      ref = (val, grads)
    np.testing.assert_allclose(val, ref[0], rtol=1e-6)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=1e-6), grads, ref[1])


def test_layers_are_stacked_and_every_parameter_is_named():
  model = llm.LLM(CFG)
  boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct) or hasattr(x, "names"))
  for path, leaf in leaves:
    assert hasattr(leaf, "names"), f"unnamed parameter {path}"
    if "layers" in str(path[0]):
      assert leaf.names[0] == "layers" and leaf.value.shape[0] == CFG.depth
  n = sum(np.prod(leaf.value.shape) for _, leaf in leaves)
  assert n == CFG.num_params


def test_lora_starts_as_the_base_model_and_merges_exactly():
  config = llm.LLMConfig(**{**CFG.__dict__, "lora": lora.LoraConfig(
      rank=4, alpha=8.0, targets=r"attn/(q|v)$|mlp/down$")})
  model, params = init(config)
  paths = ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  adapted = {p.rsplit("/", 2)[-2] for p in lora.adapter_paths(paths)}
  assert adapted == {"q", "v", "down"}
  ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 97)
  got = model.apply({"params": params}, ids)
  merged = lora.merge(params, config.lora)
  assert not lora.adapter_paths(
      ["/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(merged)])
  base = llm.LLM(CFG).apply({"params": merged}, ids)
  np.testing.assert_allclose(got, base, atol=2e-5)
  # the adapters matter: with B = 0 the adapted model is the base model, here it is not
  plain = jax.tree.map(lambda x: x, params)
  for part in ("q", "v"):
    plain["layers"]["attn"][part] = {k: v for k, v in params["layers"]["attn"][part].items()
                                     if not k.startswith("lora")}
  plain["layers"]["mlp"]["down"] = {"kernel": params["layers"]["mlp"]["down"]["kernel"]}
  assert np.abs(llm.LLM(CFG).apply({"params": plain}, ids) - got).max() > 1e-3


def test_lora_dropout_only_with_a_dropout_rng():
  config = llm.LLMConfig(**{**CFG.__dict__, "lora": lora.LoraConfig(rank=4, dropout=0.5)})
  model, params = init(config)
  ids = jnp.arange(6)[None]
  a = model.apply({"params": params}, ids)
  np.testing.assert_array_equal(a, model.apply({"params": params}, ids))
  b = model.apply({"params": params}, ids, rngs={"dropout": jax.random.key(0)})
  assert np.abs(a - b).max() > 1e-4


def test_soft_prompt_vectors_replace_the_placeholders():
  """Two prompts: a random one, and one that starts at the embeddings of tokens 11, 12."""
  config = llm.LLMConfig(**{**CFG.__dict__, "soft_prompts": (
      SoftPromptSpec(200, 3), SoftPromptSpec(201, 2, (11, 12)))})
  model, params = init(config)
  ids = jnp.array([[1, 200, 200, 200, 7, 201, 201, 8]])
  hidden_in = model.apply({"params": params}, ids, method=model.embed_tokens)
  table = params["embed"]["embedding"]
  np.testing.assert_array_equal(hidden_in[0, 1:4], params["soft_prompts_0"]["prompt"])
  np.testing.assert_array_equal(hidden_in[0, 4], table[7])
  np.testing.assert_array_equal(hidden_in[0, 5:7], table[11:13])  # Delta = 0 at init
  g = jax.grad(lambda p: model.apply({"params": p}, ids)[0, -1].sum())(params)
  assert np.abs(g["soft_prompts_0"]["prompt"]).min() > 0
  assert np.abs(g["soft_prompts_1"]["delta"]).min() > 0


def test_every_lora_factor_shards_over_fsdp():
  """The rank axis is named ("lora"): each factor takes ``fsdp`` on exactly one axis, also
  where its other axes are ``heads`` / ``mlp`` (only on ``tensor``), so no LoRA state stays
  whole on every FSDP shard (docs/scaling.md, section 3)."""
  from jax.sharding import PartitionSpec

  from bigvl import parallel

  config = llm.LLMConfig(**{**CFG.__dict__, "lora": lora.LoraConfig(
      rank=4, alpha=8.0, targets=r"attn/(q|k|v|o)$|mlp/(gate|up|down)$")})
  boxed = jax.eval_shape(llm.LLM(config).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  names = parallel.logical_names({"params": boxed["params"]})
  mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  sh = parallel.state_shardings(unbox({"params": boxed["params"]}), names,
                                parallel.DEFAULT_LOGICAL_RULES, mesh)
  specs = {parallel.path_str(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(sh)}
  factors = {p: s for p, s in specs.items() if p.endswith(("lora_a", "lora_b"))}
  assert len(factors) == 14
  for path, spec in factors.items():
    assert list(spec).count("fsdp") == 1, (path, spec)
  # q's B: [layers, rank, heads, kv] -> the rank on fsdp, the heads on tensor
  assert specs["params/layers/attn/q/lora_b"] == PartitionSpec(None, "fsdp", "tensor", None)
  assert specs["params/layers/attn/q/lora_a"] == PartitionSpec(None, "fsdp", None)
