"""Residual placements: scanned == unrolled, the formulas, Mix-LN/LN-Scaling depth handling, and
the PRepBN running statistics threaded through model.apply_train / model.apply."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks import blocks, model, norms
from jaxblocks.blocks import BlockConfig
from jaxblocks.config import ModelConfig
from jaxblocks.errors import ConfigError
from jaxblocks.norms import NormConfig
from tests.norms.model_factory import random_params

TOKENS = jax.random.randint(jax.random.key(5), (2, 8), 0, 32)


def small(topology="pre", kind="layernorm", n_layers=2, **block):
  return ModelConfig(vocab_size=32, d_model=16, n_layers=n_layers, max_seq_len=16,
                     attention_pattern=("softmax",), norm=NormConfig(kind=kind),
                     block=BlockConfig(topology=topology, **block), init_std=0.2).validate()


apply_jit = jax.jit(model.apply, static_argnames=("cfg", "return_hidden", "training"))
train_jit = jax.jit(model.apply_train, static_argnames=("cfg",))
hidden_jit = jax.jit(model.hidden_states, static_argnames=("cfg",))


def _perturbed(cfg, seed=0):
  return random_params(cfg, seed, std=0.2)


@pytest.mark.parametrize("cfg", [small("mix", mix_alpha=0.5)], ids=["mix"])
def test_scanned_equals_unrolled_gradients(cfg):
  params = _perturbed(cfg)
  loss = lambda p, c: jnp.sum(model.apply(p, TOKENS, c) ** 2)  # noqa: E731
  grads = jax.jit(jax.grad(loss), static_argnums=1)
  g_s, g_u = grads(params, cfg), grads(params, cfg.replace(scan_layers=False))
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def _manual_layers(params, cfg):
  """The placements written out by hand, layer by layer, with the core sublayers."""
  from jaxblocks.context import Context
  pos = jnp.broadcast_to(jnp.arange(TOKENS.shape[1]), TOKENS.shape)
  ctx = Context(positions=pos, n_layers=cfg.n_layers)
  n = lambda p, h: norms.apply(p, h, cfg.norm)  # noqa: E731
  x = model.embed(params, TOKENS, cfg, pos)
  if cfg.block.embed_norm:
    x = n(params["embed_norm"], x)
  attn = lambda p, h: blocks.attention_sublayer(p, h, cfg, ctx, "softmax", None)[0]  # noqa: E731
  mlp = lambda p, h: blocks.mlp_sublayer(p, h, cfg)  # noqa: E731
  n_post = cfg.block.n_post_layers(cfg.n_layers)
  for l in range(cfg.n_layers):
    p = jax.tree.map(lambda a: a[l], params["layers"][0])
    topo = cfg.block.topology
    if topo == "mix":
      topo = "post" if l < n_post else "pre"
    s = 1.0 / np.sqrt(l + 1) if cfg.block.ln_scaling else 1.0
    if topo == "pre":
      x = x + attn(p["attn"], s * n(p["attn_norm"], x))
      x = x + mlp(p["mlp"], s * n(p["mlp_norm"], x))
    elif topo == "post":
      x = n(p["attn_norm"], x + attn(p["attn"], x))
      x = n(p["mlp_norm"], x + mlp(p["mlp"], x))
    elif topo == "peri":
      x = x + n(p["attn_out_norm"], attn(p["attn"], n(p["attn_norm"], x)))
      x = x + n(p["mlp_out_norm"], mlp(p["mlp"], n(p["mlp_norm"], x)))
    elif topo == "parallel":
      h = s * n(p["attn_norm"], x)
      x = x + attn(p["attn"], h) + mlp(p["mlp"], s * n(p["mlp_norm"], x))
    elif topo == "olmo2":
      x = x + n(p["attn_out_norm"], attn(p["attn"], x))
      x = x + n(p["mlp_out_norm"], mlp(p["mlp"], x))
  return x


@pytest.mark.parametrize("cfg", [
    small("pre", ln_scaling=True), small("post"), small("peri", embed_norm=True),
    small("olmo2", kind="rmsnorm"), small("mix", mix_alpha=0.5), small("parallel", ln_scaling=True),
], ids=lambda c: c.block.topology)
def test_placement_formula_scanned_and_unrolled(cfg):
  """Each placement equals its hand-written formula, scanned (traced layer index) and unrolled."""
  params = _perturbed(cfg, 1)
  want = _manual_layers(params, cfg)
  for scan in (True, False):
    got = apply_jit(params, TOKENS, cfg.replace(scan_layers=scan), return_hidden=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_mix_alpha_extremes_equal_post_and_pre():
  pre, post = small("pre"), small("post")
  params = random_params(pre, 2)
  np.testing.assert_allclose(apply_jit(params, TOKENS, small("mix", mix_alpha=0.0)),
                             apply_jit(params, TOKENS, pre), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(apply_jit(params, TOKENS, small("mix", mix_alpha=1.0)),
                             apply_jit(params, TOKENS, post), rtol=1e-5, atol=1e-6)
  assert BlockConfig(mix_alpha=0.25).n_post_layers(6) == 1


def test_block_config_errors():
  with pytest.raises(ConfigError, match="ln_scaling"):
    small("post", ln_scaling=True)
  with pytest.raises(ConfigError, match="mix_alpha"):
    small("mix", mix_alpha=1.5)
  with pytest.raises(ConfigError, match="topology"):
    small("sideways")


def test_embedding_scale_and_norm_params():
  cfg = small("pre", kind="dyt", embed_norm=True)
  specs = model.specs(cfg)
  scale = specs["embed"]["scale"]
  assert float(scale.init(jax.random.key(0), scale.shape, scale.dtype)) == pytest.approx(4.0)
  assert "embed_norm" in specs and "alpha" in specs["embed_norm"]
  params = random_params(cfg, 0)
  h = hidden_jit(params, TOKENS, cfg)
  assert h.shape == (cfg.n_layers + 1, 2, 8, 16)
  np.testing.assert_allclose(h[-1], apply_jit(params, TOKENS, cfg, return_hidden=True), rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("topology", ["pre", "mix"])
def test_prepbn_state_training_and_eval(topology):
  cfg = small(topology, kind="prepbn", mix_alpha=0.5, n_layers=2).replace(
      norm=NormConfig(kind="prepbn", prepbn_warmup_steps=1, prepbn_decay_steps=2))
  params = random_params(cfg, 0)
  state = model.init_state(cfg)
  assert set(state["layers"][0]) == {"attn_norm", "mlp_norm"} and "final_norm" in state
  with pytest.raises(ValueError, match="state"):
    apply_jit(params, TOKENS, cfg)
  seg = jnp.array([[1] * 6 + [0] * 2, [1] * 3 + [2] * 3 + [0] * 2])
  garbage = TOKENS.at[:, 6:].set(31)
  logits_s, st_s = train_jit(params, state, TOKENS, cfg, step=jnp.int32(2), segment_ids=seg)
  # Padding (segment 0) does not touch the batch statistics.
  _, st_g = train_jit(params, state, garbage, cfg, step=jnp.int32(2), segment_ids=seg)
  for a, b in zip(jax.tree.leaves(st_s), jax.tree.leaves(st_g)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(st_s["step"]) == 2
  assert not np.allclose(st_s["layers"][0]["attn_norm"]["mean"], 0.0)
  # Scanned and unrolled agree in logits and state.
  logits_u, st_u = train_jit(params, state, TOKENS, cfg.replace(scan_layers=False),
                             step=jnp.int32(2), segment_ids=seg)
  np.testing.assert_allclose(logits_s, logits_u, rtol=1e-5,
                             atol=1e-6 * float(jnp.max(jnp.abs(logits_u))))
  for a, b in zip(jax.tree.leaves(st_s), jax.tree.leaves(st_u)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Evaluation uses the running statistics: deterministic per token, independent of the batch.
  ev = apply_jit(params, TOKENS, cfg, state=st_s)
  ev_one = apply_jit(params, TOKENS[:1], cfg, state=st_s)
  np.testing.assert_allclose(ev[:1], ev_one, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(ev))))
  if topology == "pre":
    gen = model.generate(params, TOKENS[:, :4], cfg, max_new_tokens=2, temperature=0.0,
                         state=st_s)
    assert gen.shape == (2, 2)


def test_stateless_models_keep_empty_state():
  cfg = small("pre")
  assert model.init_state(cfg) == {}
  params = random_params(cfg, 0)
  logits, st = train_jit(params, {}, TOKENS, cfg, step=jnp.int32(0))
  assert st == {}
  np.testing.assert_allclose(logits, apply_jit(params, TOKENS, cfg), rtol=1e-6)
