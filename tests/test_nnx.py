import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxblocks as jb
from jaxblocks import blocks, mlp, model, norms, params as P
from jaxblocks import nnx as jbnnx
from jaxblocks.attention import softmax
from jaxblocks.context import Context
from tests.helpers import tiny_config, tokens


def test_model_module_equals_pure_function():
  cfg = tiny_config()
  m = jbnnx.Model(cfg, rngs=nnx.Rngs(0))
  t = tokens()
  np.testing.assert_array_equal(m(t), model.apply(m.pure_params(), t, cfg))
  params = model.init(cfg, jax.random.key(5))
  wrapped = jbnnx.Model(cfg, params=params)
  np.testing.assert_array_equal(wrapped(t), model.apply(params, t, cfg))
  out = wrapped.generate(t[:, :3], max_new_tokens=3, temperature=0.0)
  np.testing.assert_array_equal(out, model.generate(params, t[:, :3], cfg, max_new_tokens=3,
                                                    temperature=0.0))


def test_sublayer_modules_equal_pure_functions():
  cfg = tiny_config()
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
  n = jbnnx.Norm(32, jb.NormConfig(kind="layernorm", bias=True), rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(n(x), norms.apply(n.pure_params(), x, n.cfg))
  f = jbnnx.Mlp(32, jb.MlpConfig(), rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(f(x), mlp.apply(f.pure_params(), x, f.cfg))
  a = jbnnx.Attention(32, cfg.attention, rngs=nnx.Rngs(2))
  ref, _ = softmax.apply(a.pure_params(), x, cfg.attention, Context(positions=pos))
  np.testing.assert_array_equal(a(x), ref)
  b = jbnnx.Block(cfg, rngs=nnx.Rngs(3))
  ref, _ = blocks.apply(b.pure_params(), x, cfg, Context(positions=pos), "softmax")
  np.testing.assert_array_equal(b(x), ref)


def test_params_carry_logical_sharding_metadata_and_train():
  cfg = tiny_config()
  m = jbnnx.Model(cfg, rngs=nnx.Rngs(0))
  wq = m.weights["layers"][0]["attn"]["wq"]
  assert wq.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "head_dim")
  t = tokens()

  def loss_fn(m):
    logits = m(t)
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  loss0, grads = nnx.value_and_grad(loss_fn)(m)
  assert jax.tree.leaves(grads)
  chex.assert_tree_all_finite(nnx.state(grads, nnx.Param))


def test_wrapping_wrong_params_fails_clearly():
  cfg = tiny_config()
  params = model.init(cfg.replace(d_model=64), jax.random.key(0))
  with pytest.raises(ValueError, match="expected shape"):
    jbnnx.Model(cfg, params=params)
  with pytest.raises(ValueError, match="rngs"):
    jbnnx.Norm(8)


def test_stateful_norms_keep_batch_stats_like_the_pure_functions():
  cfg = tiny_config(n_layers=2, norm=jb.NormConfig(kind="prepbn", prepbn_warmup_steps=1,
                                                    prepbn_decay_steps=2))
  params = model.init(cfg, jax.random.key(0))
  m = jbnnx.Model(cfg, params=params)
  t = tokens()
  state = model.init_state(cfg)
  for step in (1, 2, 3):  # the module's default step: stored step + 1
    want, state = model.apply_train(params, state, t, cfg, step=step)
    np.testing.assert_array_equal(m(t, training=True), want)
  chex.assert_trees_all_equal(m.model_state(), state)
  assert int(m.model_state()["step"]) == 3
  np.testing.assert_array_equal(m(t), model.apply(params, t, cfg, state=state))  # evaluation
  chex.assert_trees_all_equal(m.model_state(), state)  # evaluation leaves the state alone
  # Batch statistics are variables NNX can split off (and checkpoint) apart from the weights.
  _, batch_stats, _ = nnx.split(m, nnx.BatchStat, ...)
  assert len(jax.tree.leaves(batch_stats)) == len(jax.tree.leaves(state))

  n = jbnnx.Norm(32, jb.NormConfig(kind="repbn"), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 32)) * 3.0 + 1.0
  stats0 = jax.tree.map(lambda v: v[...], n.stats, is_leaf=lambda v: isinstance(v, nnx.Variable))
  y, new = norms.apply_stateful(n.pure_params(), stats0, x, n.cfg,
                                norms.NormContext(training=True, step=jnp.int32(1)))
  np.testing.assert_array_equal(n(x, training=True), y)
  chex.assert_trees_all_equal(
      jax.tree.map(lambda v: v[...], n.stats, is_leaf=lambda v: isinstance(v, nnx.Variable)), new)
  y_eval, _ = norms.apply_stateful(n.pure_params(), new, x, n.cfg, norms.NormContext())
  np.testing.assert_array_equal(n(x), y_eval)
