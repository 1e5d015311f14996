"""Gated Linear Attention layer (Yang et al., ICML 2024), attention kind ``gla``.

Per head, with state ``S ∈ R^{dk×dv}``::

    log α_t = logsigmoid(x_t W_a1 W_a2 + b) / τ         (low rank 16, τ = 16, per key dim)
    S_t = diag(α_t) S_{t-1} + k_tᵀ v_t,   o_t = (q_t dk^-½) S_t
    y = (swish(x W_r) ⊙ RMSNorm_head(o)) W_o

Widths: ``dk = expand_k · d`` (d/2) and ``dv = expand_v · d`` (d) in total, split over
``attention.n_heads`` heads (GQA with ``attention.n_kv_heads``: keys, values and gates per kv
head). Init: xavier-uniform with gain 2^-2.5 for W_q, W_k, W_a1, W_a2 (gate bias 0);
N(0, init_std) for W_v, W_r, W_o. ``attention.rope`` and ``attention.head_dim`` are not used.
Options in ``attention.gla`` (:class:`jaxblocks.attention.linear_config.GLAConfig`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblocks import norms
from jaxblocks import params as P
from jaxblocks import sharding
from jaxblocks.attention import linear_layer
from jaxblocks.attention.base import AttentionConfig, register
from jaxblocks.context import Context
from jaxblocks.errors import ConfigError

QK_GAIN = 2 ** -2.5


def dims(d_model: int, cfg: AttentionConfig):
  """``(n_heads, n_kv_heads, key_dim, value_dim)`` per head; raises ConfigError if the widths
  do not split evenly over the heads."""
  g, n = cfg.gla, cfg.n_heads
  out = []
  for name, expand in (("expand_k", g.expand_k), ("expand_v", g.expand_v)):
    total = d_model * expand
    if total != int(total) or int(total) % n or int(total) < n:
      raise ConfigError(f"attention.gla.{name}", f"d_model * {name} = {total} must be a positive "
                        f"integer multiple of attention.n_heads={n}")
    out.append(int(total) // n)
  return n, cfg.kv_heads(), out[0], out[1]


def specs(d_model: int, cfg: AttentionConfig, init_std: float = 0.02):
  n, nk, dk, dv = dims(d_model, cfg)
  g = cfg.gla
  xavier = lambda: P.xavier_uniform(QK_GAIN)
  s = {
      "wq": P.ParamSpec((d_model, n, dk), ("embed", "heads", "head_dim"), xavier()),
      "wk": P.ParamSpec((d_model, nk, dk), ("embed", "kv_heads", "head_dim"), xavier()),
      "wv": P.ParamSpec((d_model, nk, dv), ("embed", "kv_heads", "head_dim"), P.normal(init_std)),
      "gate_down": P.ParamSpec((d_model, g.gate_low_rank), ("embed", None), xavier()),
      "gate_up": P.ParamSpec((g.gate_low_rank, nk, dk), (None, "kv_heads", "head_dim"), xavier()),
      "gate_bias": P.ParamSpec((nk, dk), ("kv_heads", "head_dim"), P.zeros),
      "norm": P.ParamSpec((dv,), ("head_dim",), P.ones),
      "wo": P.ParamSpec((n, dv, d_model), ("heads", "head_dim", "embed"), P.normal(init_std)),
  }
  if g.output_gate:
    s["wr"] = P.ParamSpec((d_model, n, dv), ("embed", "heads", "head_dim"), P.normal(init_std))
  conv = linear_layer.conv_specs(g, linear_layer.qkv_channels(n, nk, dk, dv))
  if conv:
    s["conv"] = conv
  return s


def forget_gate(params, x_btd, temperature: float):
  """``log α = logsigmoid(x W_a1 W_a2 + b) / τ`` in float32, ``[batch, time, kv_heads, dk]``."""
  low = jnp.einsum("btd,dr->btr", x_btd, params["gate_down"])
  logits = jnp.einsum("btr,rkh->btkh", low, params["gate_up"], preferred_element_type=jnp.float32)
  logits = logits + params["gate_bias"].astype(jnp.float32)
  return jax.nn.log_sigmoid(logits) / temperature


def apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  """GLA over ``x[batch, time, d]``; with ``cache`` (decoding state) continues from it."""
  if x_btd.ndim != 3:
    raise ValueError(f"gla attention: expected x of shape [batch, time, d], got {x_btd.shape}")
  g = cfg.gla
  q = jnp.einsum("btd,dnh->btnh", x_btd, params["wq"])
  k = jnp.einsum("btd,dkh->btkh", x_btd, params["wk"])
  v = jnp.einsum("btd,dkh->btkh", x_btd, params["wv"])
  q, k, v, windows = linear_layer.maybe_short_conv(params, q, k, v, g, ctx, cache)
  q = sharding.constrain(q, ("batch", "seq", "heads", "head_dim"))
  k = sharding.constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
  v = sharding.constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
  log_g = forget_gate(params, x_btd, g.gate_temperature)
  o, state = linear_layer.mix(q, k, v, log_g, g, ctx, cache, scale=None)
  o = norms.rmsnorm(o, params["norm"], g.norm_eps)
  if g.output_gate:
    r = jnp.einsum("btd,dnh->btnh", x_btd, params["wr"])
    o = (jax.nn.silu(r.astype(jnp.float32)) * o.astype(jnp.float32)).astype(x_btd.dtype)
  o = sharding.constrain(o, ("batch", "seq", "heads", "head_dim"))
  y = jnp.einsum("btnh,nhd->btd", o, params["wo"])
  return y, linear_layer.new_cache(state, windows)


def init_cache(batch: int, max_len: int, d_model: int, cfg: AttentionConfig, dtype=jnp.float32):
  """Recurrent state ``[batch, kv_heads, dk, dv]`` (float32) and short-conv windows; constant
  in ``max_len``."""
  del max_len
  n, nk, dk, dv = dims(d_model, cfg)
  return linear_layer.init_cache(batch, cfg.gla, nk, dk, dv,
                                 linear_layer.qkv_channels(n, nk, dk, dv), dtype)


register("gla", specs, apply, init_cache)
