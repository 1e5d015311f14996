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
  full = jax.jit(functools.partial(jb.model.apply, cfg=cfg))(params, toks)
  step = jax.jit(functools.partial(jb.model.apply_cached, cfg=cfg))
  cache = jb.model.init_cache(cfg, 2, total)
  logits, cache = step(params, toks[:, :prompt_len], cache=cache)  # prefill: chunked form
  outs = [logits]
  for t in range(prompt_len, total):
    logits, cache = step(params, toks[:, t:t + 1], cache=cache)  # one recurrent step each
    outs.append(logits)
  _close(jnp.concatenate(outs, 1), full, 1e-4, f"decoding vs forward {cfg.attention_pattern}")
  return params, toks


@pytest.mark.parametrize("kind", KINDS)
def test_decoding_equals_forward(kind):
  # Short conv on, GQA for the kinds that support it: exercises every part of the decoding state.
  cfg = jb.ModelConfig(vocab_size=40, d_model=16, n_layers=1, attention_pattern=(kind,),
                       attention=attention_config(n_kv_heads=1, short_conv=True))
  _decode_matches_forward(cfg)


def test_hybrid_pattern_scanned_unrolled_decoding_generate():
  cfg = jb.ModelConfig(vocab_size=40, d_model=16, n_layers=4,
                       attention_pattern=("gla", "gla", "gla", "softmax"),
                       attention=attention_config())
  params, toks = _decode_matches_forward(cfg)
  assert len(params["layers"]) == 4
  scanned = jb.model.apply(params, toks, cfg)
  unrolled = jb.model.apply(params, toks, cfg.replace(scan_layers=False))
  _close(scanned, unrolled, 1e-5, "scanned vs unrolled")
  out = jb.model.generate(params, toks[:, :5], cfg, max_new_tokens=3, temperature=0.0)
  assert out.shape == (2, 3)
  # Greedy generation continues exactly like argmax of the full forward pass.
  seq = jnp.concatenate([toks[:, :5], out], 1)
  ref = jnp.argmax(jb.model.apply(params, seq, cfg)[:, 4:-1], -1)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


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
  apply = attn_base.get(kind).apply
  y_packed, _ = apply(params, x, cfg, Context(positions=pos, segment_ids=seg))
  for sl in (slice(0, 6), slice(6, 13)):
    y_sep, _ = apply(params, x[:, sl], cfg, Context(positions=pos[:, sl]))
    _close(y_packed[:, sl], y_sep, 1e-5, f"{kind} document {sl}")


@pytest.mark.parametrize("kind", KINDS)
def test_layer_forms_agree(kind):
  x = jax.random.normal(jax.random.key(4), (2, 11, 16))
  ctx = Context(positions=jnp.broadcast_to(jnp.arange(11), (2, 11)))
  ys = []
  for form in ("recurrent", "parallel", "chunk"):
    cfg = attention_config(form=form)
    params = _layer(kind, cfg)
    ys.append(attn_base.get(kind).apply(params, x, cfg, ctx)[0])
  _close(ys[1], ys[0], 1e-5, f"{kind} parallel vs recurrent")
  _close(ys[2], ys[0], 1e-5, f"{kind} chunk vs recurrent")


def test_gla_layer_bfloat16_close_to_float32():
  cfg = attention_config()
  params = _layer("gla", cfg)
  x = jax.random.normal(jax.random.key(5), (2, 20, 16))
  ctx = Context(positions=jnp.broadcast_to(jnp.arange(20), (2, 20)))
  y32, _ = gla.apply(params, x, cfg, ctx)
  y16, _ = gla.apply(P.cast_floating(params, jnp.bfloat16), x.astype(jnp.bfloat16), cfg, ctx)
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
