"""Linear attention, RetNet retention and SLA: attention kinds ``linear``, ``retention``, ``sla``.

All three run on the operators of :mod:`jaxblocks.attention.linear_ops` (no gate, scalar gate per
head, no gate) and keep a constant-size recurrent state for decoding.

* ``linear`` (Katharopoulos et al. 2020): ``φ = elu + 1``, ``S_t = S_{t-1} + φ(k_t)ᵀ v_t``,
  ``z_t = z_{t-1} + φ(k_t)``, ``o_t = φ(q_t) S_t / (φ(q_t)·z_t + eps)``. The normalizer is the
  same recurrence on values extended by a column of ones, so ``z`` is the state's last column.
  Without the normalizer the output gets a head-wise RMSNorm.
* ``retention`` (RetNet): ``S_t = γ_h S_{t-1} + k_tᵀ v_t`` with ``γ_h = 1 − 2^(−5−h)``,
  ``o_t = (q_t dk^-½) S_t``, RoPE on q/k when ``attention.rope`` (the rotation of RetNet's
  relative position), ``y = (swish(x W_g) ⊙ GroupNorm(o)) W_o`` (GroupNorm: one group per head,
  per-channel affine). Values are ``value_factor`` (2) × head_dim wide. Init: xavier-uniform with
  gain 2^-2.5 for W_q, W_k, W_v, W_g and gain 1 for W_o (RetNet's reference initialisation).
* ``sla`` (SLAB, causal): ``O = ReLU(q) S / (ReLU(q)·z + eps)`` in float32 with keys
  ``ReLU(x W_k + p_pos)`` (learned additive position term) and no 1/sqrt(d), plus a causal
  depthwise convolution of V (kernel 5, weights shared across heads); its decoding state adds
  the last ``kernel - 1`` values.

``attention.head_dim`` (default ``d_model / n_heads``) sets q/k widths; GQA via
``attention.n_kv_heads``. Projections other than retention's are N(0, init_std).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks import norms
from jaxblocks import params as P
from jaxblocks import rope as rope_lib
from jaxblocks import sharding
from jaxblocks.attention import linear_layer, short_conv
from jaxblocks.attention.base import AttentionConfig, register
from jaxblocks.context import Context

FEATURE_MAPS = {
    "elu1": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}


def _check_x(x_btd, kind):
  if x_btd.ndim != 3:
    raise ValueError(f"{kind} attention: expected x of shape [batch, time, d], got {x_btd.shape}")


def _qkv_specs(d_model, n, nk, dk, dv, q_init, k_init, v_init):
  return {
      "wq": P.ParamSpec((d_model, n, dk), ("embed", "heads", "head_dim"), q_init),
      "wk": P.ParamSpec((d_model, nk, dk), ("embed", "kv_heads", "head_dim"), k_init),
      "wv": P.ParamSpec((d_model, nk, dv), ("embed", "kv_heads", "head_dim"), v_init),
  }


def _project(params, x_btd):
  q = jnp.einsum("btd,dnh->btnh", x_btd, params["wq"])
  k = jnp.einsum("btd,dkh->btkh", x_btd, params["wk"])
  v = jnp.einsum("btd,dkh->btkh", x_btd, params["wv"])
  return q, k, v


def _constrain_qkv(q, k, v):
  return (sharding.constrain(q, ("batch", "seq", "heads", "head_dim")),
          sharding.constrain(k, ("batch", "seq", "kv_heads", "head_dim")),
          sharding.constrain(v, ("batch", "seq", "kv_heads", "head_dim")))


def _output(params, o_btnh):
  o = sharding.constrain(o_btnh, ("batch", "seq", "heads", "head_dim"))
  return jnp.einsum("btnh,nhd->btd", o, params["wo"])


def _with_conv(specs, common, channels):
  conv = linear_layer.conv_specs(common, channels)
  if conv:
    specs["conv"] = conv
  return specs


def normalized_mix(q, k, v, common, ctx, cache, eps, scale):
  """``φq·S / (φq·z + eps)`` with ``z = Σ φk``: the operator on ``[v, 1]``; float32 output."""
  ones = jnp.ones((*v.shape[:3], 1), v.dtype)
  o_ext, state = linear_layer.mix(q.astype(jnp.float32), k, jnp.concatenate([v, ones], -1), None,
                                  common, ctx, cache, scale=scale)
  return o_ext[..., :-1] / (o_ext[..., -1:] + eps), state


# ----------------------------------------------------------------------------- linear


def _linear_specs(d_model, cfg: AttentionConfig, init_std=0.02):
  n, nk, h = cfg.n_heads, cfg.kv_heads(), cfg.dim(d_model)
  init = P.normal(init_std)
  s = _qkv_specs(d_model, n, nk, h, h, init, init, init)
  s["wo"] = P.ParamSpec((n, h, d_model), ("heads", "head_dim", "embed"), init)
  if not cfg.linear.normalize:
    s["norm"] = P.ParamSpec((h,), ("head_dim",), P.ones)
  return _with_conv(s, cfg.linear, linear_layer.qkv_channels(n, nk, h, h))


def _linear_apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  _check_x(x_btd, "linear")
  lc = cfg.linear
  q, k, v = _project(params, x_btd)
  q, k, v, windows = linear_layer.maybe_short_conv(params, q, k, v, lc, ctx, cache)
  phi = FEATURE_MAPS[lc.feature_map]
  q, k, v = _constrain_qkv(phi(q), phi(k), v)
  if lc.normalize:
    o, state = normalized_mix(q, k, v, lc, ctx, cache, lc.eps, scale=1.0)
  else:
    o, state = linear_layer.mix(q, k, v, None, lc, ctx, cache, scale=None)
    o = norms.rmsnorm(o, params["norm"], lc.norm_eps)
  return _output(params, o.astype(x_btd.dtype)), linear_layer.new_cache(state, windows)


def _linear_cache(batch, max_len, d_model, cfg: AttentionConfig, dtype=jnp.float32):
  del max_len
  n, nk, h = cfg.n_heads, cfg.kv_heads(), cfg.dim(d_model)
  return linear_layer.init_cache(batch, cfg.linear, nk, h, h + int(cfg.linear.normalize),
                                 linear_layer.qkv_channels(n, nk, h, h), dtype)


register("linear", _linear_specs, _linear_apply, _linear_cache)


# ----------------------------------------------------------------------------- retention

RETENTION_GAIN = 2 ** -2.5


def retention_log_decay(n_heads: int):
  """``log γ_h = log(1 − 2^(−5−h))`` for h = 0 … n_heads-1 (float32, computed in float64)."""
  return jnp.asarray(np.log1p(-np.exp2(-5.0 - np.arange(n_heads, dtype=np.float64))),
                     jnp.float32)


def _retention_dims(d_model, cfg: AttentionConfig):
  h = cfg.dim(d_model)
  return cfg.n_heads, cfg.kv_heads(), h, max(1, int(round(h * cfg.retention.value_factor)))


def _retention_specs(d_model, cfg: AttentionConfig, init_std=0.02):
  del init_std
  n, nk, dk, dv = _retention_dims(d_model, cfg)
  xavier = P.xavier_uniform(RETENTION_GAIN)
  s = _qkv_specs(d_model, n, nk, dk, dv, xavier, xavier, xavier)
  s["wg"] = P.ParamSpec((d_model, n, dv), ("embed", "heads", "head_dim"), xavier)
  s["wo"] = P.ParamSpec((n, dv, d_model), ("heads", "head_dim", "embed"),
                        P.xavier_uniform(1.0, fan_in_axes=(0, 1)))
  s["group_norm"] = {"scale": P.ParamSpec((n, dv), ("heads", "head_dim"), P.ones),
                     "bias": P.ParamSpec((n, dv), ("heads", "head_dim"), P.zeros)}
  return _with_conv(s, cfg.retention, linear_layer.qkv_channels(n, nk, dk, dv))


def _retention_apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  _check_x(x_btd, "retention")
  rc = cfg.retention
  q, k, v = _project(params, x_btd)
  q, k, v, windows = linear_layer.maybe_short_conv(params, q, k, v, rc, ctx, cache)
  if cfg.rope:
    q = rope_lib.apply_rope(q, ctx.positions, cfg.rope_theta, cfg.rotary_fraction)
    k = rope_lib.apply_rope(k, ctx.positions, cfg.rope_theta, cfg.rotary_fraction)
  q, k, v = _constrain_qkv(q, k, v)
  b, t, nk = k.shape[:3]
  log_g = jnp.broadcast_to(retention_log_decay(nk), (b, t, nk))
  o, state = linear_layer.mix(q, k, v, log_g, rc, ctx, cache, scale=None)
  o = norms.layernorm(o, params["group_norm"]["scale"], params["group_norm"]["bias"], rc.norm_eps)
  gate = jnp.einsum("btd,dnh->btnh", x_btd, params["wg"])
  o = (jax.nn.silu(gate.astype(jnp.float32)) * o.astype(jnp.float32)).astype(x_btd.dtype)
  return _output(params, o), linear_layer.new_cache(state, windows)


def _retention_cache(batch, max_len, d_model, cfg: AttentionConfig, dtype=jnp.float32):
  del max_len
  n, nk, dk, dv = _retention_dims(d_model, cfg)
  return linear_layer.init_cache(batch, cfg.retention, nk, dk, dv,
                                 linear_layer.qkv_channels(n, nk, dk, dv), dtype)


register("retention", _retention_specs, _retention_apply, _retention_cache)


# ----------------------------------------------------------------------------- SLA


def _sla_specs(d_model, cfg: AttentionConfig, init_std=0.02):
  sc = cfg.sla
  n, nk, h = cfg.n_heads, cfg.kv_heads(), cfg.dim(d_model)
  init = P.normal(init_std)
  s = _qkv_specs(d_model, n, nk, h, h, init, init, init)
  s["wo"] = P.ParamSpec((n, h, d_model), ("heads", "head_dim", "embed"), init)
  s["value_conv"] = P.ParamSpec((sc.value_conv_size, h), (None, "head_dim"),
                                short_conv.conv_init(sc.value_conv_size))
  if sc.position_term:
    s["key_position"] = P.ParamSpec((sc.max_positions, nk, h), (None, "kv_heads", "head_dim"),
                                    P.zeros)
  return _with_conv(s, sc, linear_layer.qkv_channels(n, nk, h, h))


def _sla_apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  _check_x(x_btd, "sla")
  sc = cfg.sla
  q, k, v = _project(params, x_btd)
  q, k, v, windows = linear_layer.maybe_short_conv(params, q, k, v, sc, ctx, cache)
  if sc.position_term:
    k = k + jnp.take(params["key_position"], ctx.positions, axis=0, mode="clip").astype(k.dtype)
  q, k, v = _constrain_qkv(jax.nn.relu(q), jax.nn.relu(k), v)
  o, state = normalized_mix(q, k, v, sc, ctx, cache, sc.eps, scale=1.0)
  # Causal depthwise convolution of the values (kernel shared across heads).
  nk, h = v.shape[2:]
  w = jnp.broadcast_to(params["value_conv"][:, None, :], (params["value_conv"].shape[0], nk, h))
  prefix = None if cache is None else cache["value_conv"]
  conv_v, new_prefix = short_conv.causal_conv(v, w, prefix=prefix,
                                              segment_ids=None if cache is not None else ctx.segment_ids)
  b, t, n = o.shape[:3]
  conv_v = jnp.repeat(conv_v, n // nk, axis=2) if n != nk else conv_v
  o = (o + conv_v.astype(jnp.float32)).astype(x_btd.dtype)
  out_cache = linear_layer.new_cache(state, windows)
  if out_cache is not None:
    out_cache["value_conv"] = new_prefix.astype(cache["value_conv"].dtype)
  return _output(params, o), out_cache


def _sla_cache(batch, max_len, d_model, cfg: AttentionConfig, dtype=jnp.float32):
  del max_len
  sc = cfg.sla
  n, nk, h = cfg.n_heads, cfg.kv_heads(), cfg.dim(d_model)
  c = linear_layer.init_cache(batch, sc, nk, h, h + 1, linear_layer.qkv_channels(n, nk, h, h),
                              dtype)
  c["value_conv"] = jnp.zeros((batch, sc.value_conv_size - 1, nk, h), dtype)
  return c


register("sla", _sla_specs, _sla_apply, _sla_cache)
