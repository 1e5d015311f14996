import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxblocks as jb
from jaxblocks import model
from tests.helpers import tiny_config, tokens


class ForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtypes(self):
    cfg = tiny_config()
    params = model.init(cfg, jax.random.key(0))
    fwd = self.variant(lambda p, t: model.apply(p, t, cfg))
    logits = fwd(params, tokens())
    chex.assert_shape(logits, (2, 12, cfg.vocab_size))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


@pytest.mark.parametrize("topology", ["pre", "parallel"])
@pytest.mark.parametrize("tie", [True, False])
def test_scanned_equals_unrolled(topology, tie):
  cfg = tiny_config(n_layers=3, block=jb.BlockConfig(topology=topology), tie_embeddings=tie)
  params = model.init(cfg, jax.random.key(0))
  t = tokens()
  a = model.apply(params, t, cfg)
  b = model.apply(params, t, cfg.replace(scan_layers=False))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_named"])
def test_remat_keeps_values_and_grads(policy):
  cfg = tiny_config()
  params = model.init(cfg, jax.random.key(0))
  t = tokens()

  def loss(p, c):
    return jnp.mean(jax.nn.log_softmax(model.apply(p, t, c))[..., 0])

  l0, g0 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, cfg)
  for scan in (True, False):
    c = cfg.replace(remat=policy, scan_layers=scan)
    l1, g1 = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, c)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    chex.assert_trees_all_close(g0, g1, rtol=1e-5, atol=1e-7)


@settings(max_examples=4)
@given(prompt_len=st.integers(1, 9), chunk=st.integers(1, 4), window=st.sampled_from([None, 3]))
def test_kv_cache_decoding_matches_forward(prompt_len, chunk, window):
  cfg = tiny_config(attention=jb.AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=window,
                                                 qk_norm="head"))
  params = model.init(cfg, jax.random.key(0))
  t = tokens(time=12)
  full = jax.jit(model.apply, static_argnums=2)(params, t, cfg)
  cache = model.init_cache(cfg, 2, 16)
  step = jax.jit(model.apply_cached, static_argnums=2)
  logits, cache = step(params, t[:, :prompt_len], cfg, cache)
  outs = [logits]
  pos = prompt_len
  while pos < 12:
    n = min(chunk, 12 - pos)
    logits, cache = step(params, t[:, pos:pos + n], cfg, cache)
    outs.append(logits)
    pos += n
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)
  assert int(cache["index"]) == 12


def test_generate_greedy_matches_argmax_rollout():
  cfg = tiny_config(position_embedding="learned", attention=jb.AttentionConfig(n_heads=4, rope=False))
  params = model.init(cfg, jax.random.key(0))
  prompt = tokens(time=5)
  out = model.generate(params, prompt, cfg, max_new_tokens=4, temperature=0.0)
  chex.assert_shape(out, (2, 4))
  seq = prompt
  fwd = jax.jit(model.apply, static_argnums=2)
  for _ in range(4):
    nxt = jnp.argmax(fwd(params, seq, cfg)[:, -1], axis=-1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq[:, 5:])


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 200)
  top1 = jax.vmap(lambda k: model.sample_logits(logits, k, 1.0, top_k=1))(keys)
  assert set(np.unique(top1)) == {0}
  topp = jax.vmap(lambda k: model.sample_logits(logits, k, 1.0, top_p=0.7))(keys)
  assert set(np.unique(topp)) <= {0, 1} and len(np.unique(topp)) == 2
  anyk = jax.vmap(lambda k: model.sample_logits(logits, k, 1.0))(keys)
  assert len(np.unique(anyk)) >= 3


def test_packed_segments_do_not_attend_across_documents():
  cfg = tiny_config()
  params = model.init(cfg, jax.random.key(0))
  t = tokens(batch=1, time=10)
  seg = jnp.array([[1] * 4 + [2] * 6], jnp.int32)
  packed = model.apply(params, t, cfg, segment_ids=seg)
  first = model.apply(params, t[:, :4], cfg)
  second = model.apply(params, t[:, 4:], cfg)
  np.testing.assert_allclose(packed[:, :4], first, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[:, 4:], second, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_close_to_float32():
  cfg = tiny_config()
  params = model.init(cfg, jax.random.key(0))
  t = tokens()
  f32 = model.apply(params, t, cfg)
  bf16 = model.apply(params, t, cfg.replace(dtype="bfloat16"))
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, atol=0.05)


def test_param_count_matches_formula():
  cfg = tiny_config(tie_embeddings=False)
  d, v, f, h = 32, 61, cfg.mlp.hidden(32), 8
  per_layer = d * 4 * h + 2 * d * 2 * h + 4 * h * d + 3 * d * f + 2 * d
  assert model.count_params(cfg) == v * d + 2 * per_layer + d + d * v
