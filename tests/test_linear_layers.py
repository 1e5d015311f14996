"""Linear-attention layers (gla, linear, retention, sla) and hybrid models: decoding, packing,
forms, configs and inits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import params as P
from jaxblocks.attention import base as attn_base
from jaxblocks.attention import gla, linear
from jaxblocks.context import Context
from jaxblocks.errors import ConfigError

KINDS = ("gla", "linear", "retention", "sla")
# Unoptimised XLA compiles: each program here runs once or twice.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                       "xla_llvm_disable_expensive_passes": True})


def attention_config(n_kv_heads=None, **common):
  """Small-chunk configs for every linear kind, with ``common`` fields applied to all."""
  common = {"chunk_size": 8, "sub_chunk": 4, **common}
  att = jb.AttentionConfig(n_heads=2, n_kv_heads=n_kv_heads)
  return dataclasses.replace(att, **{
      kind: dataclasses.replace(getattr(att, kind), **common)
      for kind in ("gla", "linear", "retention", "sla")})


def _close(a, b, tol, what):
  err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
  assert err <= tol, f"{what}: max error {err} > {tol}"


def _decode_matches_forward(cfg, prompt_len=7, total=12):
  params = jb.model.init(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, total), 0, cfg.vocab_size)
  full = fast_jit(functools.partial(jb.model.apply, cfg=cfg))(params, toks)
  step = fast_jit(functools.partial(jb.model.apply_cached, cfg=cfg))
  cache = jb.model.init_cache(cfg, 2, total)
  logits, cache = step(params, toks[:, :prompt_len], cache=cache)  # prefill: chunked form
  outs = [logits]
  for t in range(prompt_len, total):
    logits, cache = step(params, toks[:, t:t + 1], cache=cache)  # one recurrent step each
    outs.append(logits)
  _close(jnp.concatenate(outs, 1), full, 1e-4, f"decoding vs forward {cfg.attention_pattern}")
  return params, toks


def test_decoding_equals_forward_every_kind():
  # One model with a layer of every kind (short conv on, GQA): the prefill (chunked form from the
  # zero state) and every single-token step (recurrent step) must reproduce the full forward pass.
  cfg = jb.ModelConfig(vocab_size=40, d_model=16, n_layers=5,
                       attention_pattern=KINDS + ("softmax",),
                       attention=attention_config(n_kv_heads=1, short_conv=True))
  _decode_matches_forward(cfg)


def test_hybrid_pattern_scanned_unrolled_generate():
  cfg = jb.ModelConfig(vocab_size=40, d_model=16, n_layers=4,
                       attention_pattern=("gla", "gla", "gla", "softmax"),
                       attention=attention_config())
  params = jb.model.init(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  assert len(params["layers"]) == 4
  scanned = fast_jit(functools.partial(jb.model.apply, cfg=cfg))(params, toks[:, :5])
  unrolled = fast_jit(functools.partial(jb.model.apply, cfg=cfg.replace(scan_layers=False)))(
      params, toks[:, :5])
  _close(scanned, unrolled, 1e-5, "scanned vs unrolled")
  out = jb.model.generate(params, toks[:, :5], cfg, max_new_tokens=3, temperature=0.0)
  assert out.shape == (2, 3) and int(out.min()) >= 0 and int(out.max()) < cfg.vocab_size
  # Greedy: the first new token is the argmax of the forward pass at the prompt's last position.
  np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(jnp.argmax(scanned[:, 4], -1)))


def run_layer(kind, cfg, params, x, positions, segment_ids=None):
  """One compiled call of a layer's apply (no cache)."""
  def fn(params, x, positions, segment_ids):
    return attn_base.get(kind).apply(params, x, cfg, Context(positions=positions,
                                                             segment_ids=segment_ids))[0]
  return fast_jit(fn)(params, x, positions, segment_ids)


def _layer(kind, cfg, d_model=16):
  specs = attn_base.get(kind).specs(d_model, cfg, 0.02)
  return P.init(specs, jax.random.key(2))


@pytest.mark.parametrize("kind", ["gla", "sla"])
def test_packed_documents_do_not_leak(kind):
  # Short conv (and SLA's value conv) must not reach across a document boundary either.
  cfg = attention_config(short_conv=True)
  params = _layer(kind, cfg)
  x = jax.random.normal(jax.random.key(3), (1, 13, 16))
  seg = jnp.asarray([[1] * 6 + [2] * 7])
  pos = jb.model.segment_positions(seg)
  y_packed = run_layer(kind, cfg, params, x, pos, seg)
  for sl in (slice(0, 6), slice(6, 13)):
    y_sep = run_layer(kind, cfg, params, x[:, sl], pos[:, sl])
    _close(y_packed[:, sl], y_sep, 1e-5, f"{kind} document {sl}")


def test_gla_layer_bfloat16_chunked_close_to_float32_recurrent():
  # Also checks that ``form`` selects the operator form (chunk here, recurrent for the reference).
  cfg = attention_config()
  params = _layer("gla", cfg)
  x = jax.random.normal(jax.random.key(5), (2, 20, 16))
  pos = jnp.broadcast_to(jnp.arange(20), (2, 20))
  y32 = run_layer("gla", attention_config(form="recurrent"), params, x, pos)
  y16 = run_layer("gla", cfg, P.cast_floating(params, jnp.bfloat16), x.astype(jnp.bfloat16), pos)
  assert y16.dtype == jnp.bfloat16
  scale = float(jnp.max(jnp.abs(y32)))
  _close(y16, y32, 5e-2 * scale, "bf16 GLA layer")


def test_gla_shapes_and_published_init():
  d = 64
  cfg = jb.AttentionConfig(n_heads=4)
  specs = gla.specs(d, cfg, 0.02)
  assert specs["wq"].shape == (d, 4, 8) and specs["wk"].shape == (d, 4, 8)  # dk = d/2
  assert specs["wv"].shape == (d, 4, 16) and specs["wr"].shape == (d, 4, 16)  # dv = d
  assert specs["gate_down"].shape == (d, 16) and specs["gate_up"].shape == (16, 4, 8)
  assert specs["norm"].shape == (16,)  # head-wise RMSNorm over dv
  p = P.init(specs, jax.random.key(0))
  bound = 2 ** -2.5 * np.sqrt(6 / (d + d // 2))
  assert float(jnp.max(jnp.abs(p["wq"]))) <= bound
  assert float(jnp.max(jnp.abs(p["wq"]))) > 0.8 * bound  # uniform fills its range
  assert float(jnp.max(jnp.abs(p["gate_up"]))) <= 2 ** -2.5 * np.sqrt(6 / (16 + d // 2))
  assert abs(float(jnp.std(p["wv"])) - 0.02) < 0.003
  # Gate at init: logsigmoid(x W1 W2) / 16 is a weak decay in (-log 2 / 16 ± small).
  x = jax.random.normal(jax.random.key(1), (1, 5, d))
  log_g = gla.forget_gate(p, x, 16.0)
  assert log_g.shape == (1, 5, 4, 8) and log_g.dtype == jnp.float32
  assert float(jnp.max(log_g)) < 0 and float(jnp.min(log_g)) > -0.2


def test_retention_decays_and_state_sizes():
  np.testing.assert_allclose(np.exp(np.asarray(linear.retention_log_decay(3))),
                             [1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7], rtol=1e-6)
  cfg = jb.AttentionConfig(n_heads=2)
  c = attn_base.get("retention").init_cache(3, 1000, 16, cfg, jnp.bfloat16)
  assert c["state"].shape == (3, 2, 8, 16) and c["state"].dtype == jnp.float32  # dv = 2 dk
  c = attn_base.get("linear").init_cache(3, 10 ** 6, 16, cfg, jnp.float32)
  assert c["state"].shape == (3, 2, 8, 9)  # normalizer column; independent of max_len


def test_config_round_trip_and_errors():
  cfg = jb.ModelConfig.from_dict({
      "d_model": 32, "n_layers": 4, "attention_pattern": ["gla", "gla", "gla", "softmax"],
      "attention": {"gla": {"chunk_size": 32, "short_conv": True}, "sla": {"max_positions": 64}}})
  cfg.validate()
  assert cfg.attention.gla.chunk_size == 32 and cfg.attention.gla.short_conv
  assert jb.ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ConfigError, match="attention.gla.chunk_size"):
    cfg.replace(attention=dataclasses.replace(
        cfg.attention, gla=dataclasses.replace(cfg.attention.gla, sub_chunk=24))).validate()
  with pytest.raises(ConfigError, match="attention.linear.feature_map"):
    cfg.replace(attention=dataclasses.replace(
        cfg.attention, linear=dataclasses.replace(cfg.attention.linear, feature_map="exp"))
    ).validate()
  with pytest.raises(ConfigError, match="attention.gla.bogus"):
    jb.ModelConfig.from_dict({"attention": {"gla": {"bogus": 1}}})
  with pytest.raises(ConfigError, match="attention.gla.expand_k"):
    gla.specs(30, jb.AttentionConfig(n_heads=4), 0.02)
