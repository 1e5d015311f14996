"""The model on 8 simulated devices under every preset equals the unsharded model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as PS

import jaxblocks as jb
from jaxblocks import model, params as P, sharding
from tests.helpers import tiny_config, tokens

MESHES = {
    "dp": {"data": 8},
    "fsdp": {"data": 2, "fsdp": 4},
    "fsdp_tp": {"fsdp": 4, "tensor": 2},
    "sp": {"fsdp": 2, "sequence": 4},
}


def _loss(params, t, cfg):
  logits = model.apply(params, t, cfg)
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0])


@pytest.fixture(scope="module")
def reference():
  cfg = tiny_config(attention=jb.AttentionConfig(n_heads=4, n_kv_heads=2))
  params = model.init(cfg, jax.random.key(0))
  t = tokens(batch=8, time=8)
  loss, grads = jax.value_and_grad(_loss)(params, t, cfg)
  return cfg, params, t, loss, grads


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_preset_matches_unsharded(preset, reference):
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg, params_ref, t, loss_ref, grads_ref = reference
  mesh = sharding.make_mesh(MESHES[preset])
  rules = sharding.PRESETS[preset]
  params = model.init(cfg, jax.random.key(0), mesh, rules)
  chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(params_ref))
  tok_sharding = sharding.named_sharding(("batch", "seq"), mesh, rules, t.shape)
  t_sh = jax.device_put(t, tok_sharding)

  def step(p, t):
    with sharding.use_rules(mesh, rules):
      return jax.value_and_grad(_loss)(p, t, cfg)

  shard_tree = P.shardings(model.specs(cfg), mesh, rules)
  loss, grads = jax.jit(step, out_shardings=(NamedSharding(mesh, PS()), shard_tree))(params, t_sh)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(grads), jax.device_get(grads_ref), rtol=1e-4, atol=1e-6)


def test_parameters_carry_expected_shardings():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  cfg = tiny_config()
  mesh = sharding.make_mesh(MESHES["fsdp_tp"])
  params = model.init(cfg, jax.random.key(0), mesh, "fsdp_tp")
  layer = params["layers"][0]
  assert layer["attn"]["wq"].sharding.spec == PS(None, "fsdp", "tensor")
  assert layer["attn"]["wo"].sharding.spec == PS(None, "tensor", None, "fsdp")
  assert layer["mlp"]["w_up"].sharding.spec == PS(None, "fsdp", "tensor")
  assert params["embed"]["tokens"].sharding.spec == PS(None, "fsdp")  # vocab 61 not divisible
  # Each device holds only its shard.
  assert layer["mlp"]["w_up"].addressable_shards[0].data.shape == (
      cfg.repeats, 32 // 4, cfg.mlp.hidden(32) // 2)
  fsdp = sharding.make_mesh(MESHES["fsdp"])
  p2 = model.init(cfg, jax.random.key(0), fsdp, "fsdp")
  assert p2["layers"][0]["attn"]["wq"].sharding.spec == PS(None, "fsdp")
