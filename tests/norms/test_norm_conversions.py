"""Exact conversions: Pre-LN → Pre-RMSNorm → Pre-CRMSNorm, FlashNorm folding (and deferral),
PRepBN → inference. Property tests over random small models in float64 (tolerance 1e-9 relative to
the logit scale); precondition errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxblocks import model, norms
from jaxblocks import params as P
from jaxblocks.attention.base import AttentionConfig
from jaxblocks.blocks import BlockConfig
from jaxblocks.config import ModelConfig
from jaxblocks.errors import ConfigError
from jaxblocks.mlp import MlpConfig
from jaxblocks.norms import NormConfig
from jaxblocks.tricks import flashnorm, prepbn_fold, rmsnorm_conversion
from jaxblocks.tricks.folding import ConversionError
from tests.norms.model_factory import random_params

apply_jit = jax.jit(model.apply, static_argnames=("cfg",))
hidden_jit = jax.jit(model.hidden_states, static_argnames=("cfg",))


@st.composite
def small_models(draw, kinds=("layernorm",)):
  topology = draw(st.sampled_from(["pre", "parallel"]))
  cfg = ModelConfig(
      vocab_size=24, d_model=draw(st.sampled_from([8, 12, 16])), n_layers=draw(st.integers(1, 2)),
      max_seq_len=12,
      norm=NormConfig(kind=draw(st.sampled_from(kinds)), bias=draw(st.booleans()), eps=1e-5,
                      scale_offset=draw(st.sampled_from([0.0, 1.0]))),
      attention=AttentionConfig(n_heads=2, n_kv_heads=draw(st.sampled_from([1, 2])),
                                bias=draw(st.booleans()), out_bias=draw(st.booleans()),
                                rope=draw(st.booleans())),
      mlp=MlpConfig(kind=draw(st.sampled_from(["gelu", "swiglu"])), d_ff=24,
                    bias=draw(st.booleans())),
      block=BlockConfig(topology=topology, ln_scaling=draw(st.booleans()),
                        parallel_shared_norm=topology == "parallel" and draw(st.booleans())),
      position_embedding=draw(st.sampled_from(["none", "learned"])),
      tie_embeddings=draw(st.booleans()), scale_embeddings=draw(st.booleans()),
      head_bias=draw(st.booleans()), dtype="float64", param_dtype="float64")
  if cfg.tie_embeddings:
    cfg = cfg.replace(head_bias=False)
  if cfg.norm.kind in ("single_scale_rmsnorm", "repbn") and cfg.norm.bias:
    cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, bias=False))
  return cfg.validate(), draw(st.integers(0, 2**16))


def tokens_for(cfg, seed):
  return jax.random.randint(jax.random.key(seed), (2, 10), 0, cfg.vocab_size)


def assert_same_logits(a, b, rtol=1e-9):
  scale = float(jnp.max(jnp.abs(a)))
  np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=rtol * scale + 1e-12)


@settings(max_examples=4, deadline=None)
@given(small_models())
def test_pre_ln_to_rmsnorm_to_crmsnorm_is_exact(model_and_seed):
  cfg, seed = model_and_seed
  with jax.enable_x64(True):
    params = random_params(cfg, seed)
    tokens = tokens_for(cfg, seed)
    ref = apply_jit(params, tokens, cfg)
    p_rms, c_rms = rmsnorm_conversion.to_pre_rmsnorm(params, cfg)
    assert c_rms.norm.kind == "rmsnorm" and not c_rms.norm.scale and not c_rms.norm.bias
    assert_same_logits(ref, apply_jit(p_rms, tokens, c_rms))
    # The residual stream really is zero-mean now: every layer output.
    hidden = hidden_jit(p_rms, tokens, c_rms)
    assert float(jnp.max(jnp.abs(hidden.mean(-1)))) < 1e-9 * float(jnp.max(jnp.abs(hidden)))
    p_c, c_c = rmsnorm_conversion.to_pre_crmsnorm(p_rms, c_rms)
    assert c_c.d_model == cfg.d_model - 1 and c_c.norm.kind == "crmsnorm"
    assert p_c["embed"]["tokens"].shape == (cfg.vocab_size, cfg.d_model - 1)
    assert_same_logits(ref, apply_jit(p_c, tokens, c_c))


@settings(max_examples=6, deadline=None)
@given(small_models(kinds=("layernorm", "rmsnorm", "dyt", "single_scale_rmsnorm")))
def test_flashnorm_fold_is_exact(model_and_seed):
  cfg, seed = model_and_seed
  with jax.enable_x64(True):
    params = random_params(cfg, seed)
    tokens = tokens_for(cfg, seed)
    p2, c2 = flashnorm.fold_norm_weights(params, cfg)
    assert not c2.norm.scale and not c2.norm.bias and c2.norm.scale_offset == 0.0
    for lp in p2["layers"]:
      assert "scale" not in lp["attn_norm"] and "bias" not in lp["attn_norm"]
    assert_same_logits(apply_jit(params, tokens, cfg), apply_jit(p2, tokens, c2))


def test_flashnorm_gemma_offset_gain_folded_as_one_plus_w():
  cfg = ModelConfig(vocab_size=24, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2),
                    norm=NormConfig(kind="rmsnorm", scale_offset=1.0))
  params = random_params(cfg, 0)
  p2, c2 = flashnorm.fold_norm_weights(params, cfg)
  w = params["layers"][0]["attn_norm"]["scale"][0]
  np.testing.assert_allclose(p2["layers"][0]["attn"]["wq"][0],
                             (1.0 + w)[:, None, None] * params["layers"][0]["attn"]["wq"][0],
                             rtol=1e-6)
  tokens = tokens_for(cfg, 1)
  assert_same_logits(apply_jit(params, tokens, cfg), apply_jit(p2, tokens, c2), rtol=1e-5)


@jax.jit
def _deferred_vs_reference(x, w):
  normalize_then_project = lambda x: jnp.einsum("btd,do->bto", norms.rmsnorm(x), w)  # noqa: E731
  deferred = lambda x: flashnorm.deferred_rms_project(x, w)  # noqa: E731
  g_deferred = jax.grad(lambda x: jnp.sum(deferred(x) ** 2))(x)
  g_reference = jax.grad(lambda x: jnp.sum(normalize_then_project(x) ** 2))(x)
  return deferred(x), normalize_then_project(x), g_deferred, g_reference


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([8, 16]), st.floats(0.01, 100.0), st.integers(0, 1000))
def test_deferred_rms_projection_matches_normalize_then_project(d, spread, seed):
  x = jax.random.normal(jax.random.key(seed), (2, 3, d)) * spread
  w = jax.random.normal(jax.random.key(seed + 1), (d, 4))
  y, want, g1, g2 = _deferred_vs_reference(x, w)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(g2))))


def test_deferral_checks():
  cfg = ModelConfig(vocab_size=24, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2),
                    norm=NormConfig(kind="rmsnorm"))
  params = random_params(cfg, 0)
  with pytest.raises(ConversionError, match="fold_norm_weights"):
    flashnorm.check_deferrable(params, cfg)
  p2, c2 = flashnorm.fold_norm_weights(params, cfg)
  flashnorm.check_deferrable(p2, c2)  # bias-free: fine
  ln = cfg.replace(norm=NormConfig(kind="layernorm", bias=True))
  p3, c3 = flashnorm.fold_norm_weights(random_params(ln, 1), ln)
  p3, c3 = p3, c3.replace(norm=NormConfig(kind="rmsnorm", scale=False))
  with pytest.raises(ConversionError, match="deferral is impossible"):
    flashnorm.check_deferrable(p3, c3)
  with pytest.raises(ValueError, match="last dim"):
    flashnorm.deferred_rms_project(jnp.ones((2, 4)), jnp.ones((3, 2)))


@settings(max_examples=3, deadline=None)
@given(small_models(kinds=("rmsnorm",)))
def test_deferred_normalization_model_is_exact_with_gradients(model_and_seed):
  cfg, seed = model_and_seed
  cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, bias=False),
                    mlp=dataclasses.replace(cfg.mlp, bias=False))
  with jax.enable_x64(True):
    params = random_params(cfg, seed)
    tokens = tokens_for(cfg, seed)
    p_fold, c_fold = flashnorm.fold_norm_weights(params, cfg)
    if c_fold.attention.bias:  # only zero biases can be deferred
      p_fold = jax.tree_util.tree_map_with_path(
          lambda path, x: jnp.zeros_like(x) if jax.tree_util.keystr(path).endswith(
              ("['bq']", "['bk']", "['bv']")) else x, p_fold)
    p_def, c_def = flashnorm.defer_normalization(p_fold, c_fold)
    assert c_def.norm.deferred and not c_def.attention.bias
    assert_same_logits(apply_jit(p_fold, tokens, c_fold), apply_jit(p_def, tokens, c_def))

    def loss(p, c):
      return jnp.mean(jax.nn.log_softmax(model.apply(p, tokens, c))[..., 0])

    g_fold = jax.jit(jax.grad(loss), static_argnums=1)(p_fold, c_fold)
    g_def = jax.jit(jax.grad(loss), static_argnums=1)(p_def, c_def)
    for path, g in P.flatten_dict(g_def).items():
      want = P.flatten_dict(g_fold)[path]
      np.testing.assert_allclose(g, want, rtol=1e-8, atol=1e-10 * float(np.abs(want).max() + 1),
                                 err_msg=path)


def test_deferred_normalization_preconditions():
  with pytest.raises(ConfigError, match="model.norm.deferred"):
    NormConfig(kind="rmsnorm", deferred=True).validate("model.norm")  # still has its gain
  weightless = NormConfig(kind="rmsnorm", scale=False, deferred=True)
  with pytest.raises(ConfigError, match="model.norm.deferred"):
    ModelConfig(vocab_size=24, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2),
                norm=weightless, block=BlockConfig(topology="post")).validate()
  cfg = ModelConfig(vocab_size=24, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2),
                    mlp=MlpConfig(bias=True), norm=NormConfig(kind="rmsnorm", scale=False))
  params = random_params(cfg, 0)
  with pytest.raises(ConversionError, match="deferral is impossible.*mlp.b_up"):
    flashnorm.defer_normalization(params, cfg)
  zero = {"b_up": 0.0, "b_gate": 0.0}
  params["layers"][0]["mlp"] = {k: v * zero.get(k, 1.0) for k, v in params["layers"][0]["mlp"].items()}
  with pytest.raises(ConversionError, match="model.mlp.bias"):
    flashnorm.defer_normalization(params, cfg)


def _train_prepbn(cfg, steps):
  params = random_params(cfg, 3)
  state = model.init_state(cfg)
  train = jax.jit(model.apply_train, static_argnames=("cfg",))
  seg = jnp.array([[1] * 8 + [0] * 2, [1] * 4 + [2] * 6])
  for step in steps:
    _, state = train(params, state, tokens_for(cfg, step), cfg, step=jnp.int32(step),
                     segment_ids=seg)
  return params, state


@settings(max_examples=3, deadline=None)
@given(small_models(kinds=("prepbn", "repbn")))
def test_prepbn_fold_is_exact_after_schedule(model_and_seed):
  cfg, seed = model_and_seed
  cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, bias=cfg.norm.kind == "prepbn",
                                             scale_offset=0.0, prepbn_warmup_steps=0,
                                             prepbn_decay_steps=1))
  with jax.enable_x64(True):
    params, state = _train_prepbn(cfg, [0, 1])
    tokens = tokens_for(cfg, seed)
    ref = apply_jit(params, tokens, cfg, state=state)
    p2, c2 = prepbn_fold.fold_prepbn(params, state, cfg)
    assert c2.norm.kind == "none" and model.init_state(c2) == {}
    assert_same_logits(ref, apply_jit(p2, tokens, c2))


def test_prepbn_fold_refuses_unfinished_schedule():
  cfg = ModelConfig(vocab_size=24, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2),
                    norm=NormConfig(kind="prepbn", prepbn_warmup_steps=2, prepbn_decay_steps=4))
  params, state = _train_prepbn(cfg, [0, 3])
  with pytest.raises(ConversionError, match="schedule is not finished"):
    prepbn_fold.fold_prepbn(params, state, cfg)
  with pytest.raises(ConversionError, match="state"):
    prepbn_fold.fold_prepbn(params, {}, cfg)


BASE = ModelConfig(vocab_size=24, d_model=8, n_layers=1, attention=AttentionConfig(n_heads=2),
                   norm=NormConfig(kind="layernorm"))


@pytest.mark.parametrize("cfg,match", [
    (BASE.replace(norm=NormConfig(kind="rmsnorm")), "layernorm"),
    (BASE.replace(block=BlockConfig(topology="peri")), "topology='peri'"),
    (BASE.replace(block=BlockConfig(topology="post")), "topology='post'"),
    (BASE.replace(block=BlockConfig(embed_norm=True)), "embed_norm"),
    (BASE.replace(final_norm=False), "final_norm"),
    (BASE.replace(attention_pattern=("no_such",)), "attention_pattern|attention kind"),
])
def test_rmsnorm_conversion_preconditions(cfg, match):
  try:
    params = random_params(cfg, 0)
  except ValueError:
    params = None
  with pytest.raises((ConversionError, ValueError), match=match):
    rmsnorm_conversion.to_pre_rmsnorm(params, cfg)


def test_crmsnorm_preconditions():
  rms = BASE.replace(norm=NormConfig(kind="rmsnorm", scale=False))
  params = random_params(rms, 0)
  with pytest.raises(ConversionError, match="not zero-mean"):
    rmsnorm_conversion.to_pre_crmsnorm(params, rms)
  with_scale = BASE.replace(norm=NormConfig(kind="rmsnorm"))
  with pytest.raises(ConversionError, match="fold them"):
    rmsnorm_conversion.to_pre_crmsnorm(random_params(with_scale, 0), with_scale)


def test_flashnorm_preconditions():
  for kind in ("seednorm", "bhyt"):
    cfg = BASE.replace(norm=NormConfig(kind=kind))
    with pytest.raises(ConversionError, match="no foldable affine"):
      flashnorm.fold_norm_weights(random_params(cfg, 0), cfg)
  cfg = BASE.replace(block=BlockConfig(topology="olmo2"))
  with pytest.raises(ConversionError, match="topology"):
    flashnorm.fold_norm_weights(random_params(cfg, 0), cfg)


def test_dropout_is_refused():
  @dataclasses.dataclass(frozen=True)
  class WithDropout(BlockConfig):
    residual_dropout: float = 0.1

  cfg = BASE.replace(block=WithDropout())
  with pytest.raises(ConversionError, match="dropout"):
    rmsnorm_conversion.to_pre_rmsnorm(random_params(BASE, 0), cfg)
