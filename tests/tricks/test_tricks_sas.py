import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import model
from jaxblocks.attention import shaped
from jaxblocks.context import Context
from tests.helpers import tiny_config, tokens
from tests.tricks.tricks_helpers import apply, init, cached_logits, perturb

ATTN = jb.AttentionConfig(n_heads=4)


def _cfg(topology, **kw):
  base = dict(n_layers=2, attention_pattern=("shaped",), attention=ATTN,
              block=jb.BlockConfig(topology=topology), mlp=jb.MlpConfig(kind="gelu"))
  base.update(kw)
  return tiny_config(**base)


def _layer0_attn(params):
  return jax.tree.map(lambda a: a[0], params["layers"][0]["attn"])


@pytest.mark.parametrize("segments", [False, True])
def test_shaped_attention_is_identity_at_init(segments):
  cfg = _cfg("sas")
  p = _layer0_attn(init(cfg, jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, 7, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2]] * 2) if segments else None
  if segments:
    pos = model.segment_positions(seg)
  a = shaped.attention_matrix(p, x, cfg.attention, pos, seg)
  np.testing.assert_allclose(a, jnp.broadcast_to(jnp.eye(7), a.shape), atol=1e-6)
  y, _ = shaped.apply(p, x, cfg.attention, Context(positions=pos, segment_ids=seg))
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_shaped_attention_equals_explicit_matrix():
  cfg = _cfg("sas")
  p = perturb(_layer0_attn(init(cfg, jax.random.key(0))), 2, 0.3)
  x = jax.random.normal(jax.random.key(1), (2, 6, cfg.d_model))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  a = shaped.attention_matrix(p, x, cfg.attention, pos)
  assert not np.allclose(a, jnp.eye(6), atol=1e-2)
  rows = np.asarray(a).sum(-1)  # β·1 + α − γ for every row
  np.testing.assert_allclose(rows, np.broadcast_to((p["beta"] + p["alpha"] - p["gamma"])[None, :,
                                                   None], rows.shape), rtol=1e-5)
  v = x.reshape(2, 6, 4, 8) * p["v_gain"]
  want = jnp.einsum("bnts,bsnh->btnh", a, v).reshape(2, 6, -1) * p["o_gain"]
  y, _ = shaped.apply(p, x, cfg.attention, Context(positions=pos))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topology,norm,first_value", [
    ("sas", "none", True), pytest.param("sas_p", "rmsnorm", False, marks=pytest.mark.slow)])
def test_sas_models_scan_unroll_decode(topology, norm, first_value):
  cfg = _cfg(topology, norm=jb.NormConfig(kind=norm), block=jb.BlockConfig(
      topology=topology, sas_first_layer_value=first_value))
  params = perturb(init(cfg, jax.random.key(0)), 3)
  assert ("topology" in params) == first_value
  t = tokens()
  ref = apply(params, t, cfg)
  np.testing.assert_allclose(apply(params, t, cfg.replace(scan_layers=False)), ref,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached_logits(params, cfg, t, prompt_len=5, chunk=3), ref,
                             rtol=1e-5, atol=1e-5)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(apply(p, t, cfg) ** 2)))(params)
  chex_leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in chex_leaves)
  assert float(jnp.abs(grads["layers"][0]["attn"]["alpha"]).sum()) > 0


def test_sas_block_at_init_and_gains():
  cfg = _cfg("sas_p")
  params = init(cfg, jax.random.key(0))
  layer = params["layers"][0]
  np.testing.assert_allclose(layer["beta_ff"], 0.1)
  np.testing.assert_allclose(layer["beta_sa"], 1.0)
  assert not np.any(layer["attn"]["wq"])
  pre = tiny_config(n_layers=2, attention=ATTN, mlp=jb.MlpConfig(kind="gelu"))
  assert model.count_params(cfg) < model.count_params(pre)


def test_sas_bad_configs():
  with pytest.raises(jb.ConfigError, match="attention_pattern"):
    init(_cfg("sas", attention_pattern=("softmax",)), jax.random.key(0))
  with pytest.raises(jb.ConfigError, match="n_kv_heads"):
    init(_cfg("sas_p", attention=jb.AttentionConfig(n_heads=4, n_kv_heads=2)),
               jax.random.key(0))
  with pytest.raises(jb.ConfigError, match="head_dim"):
    init(_cfg("sas", attention=jb.AttentionConfig(n_heads=4, head_dim=4)), jax.random.key(0))
