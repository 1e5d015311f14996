"""Slim attention (Graef, 2025): multi-head softmax attention with a K-only cache.

With a square, invertible key matrix ``W_K`` (``n_heads · head_dim == d_model``, one key head per
query head) the values are a linear function of the keys: ``V = X·W_V = K·W_KV`` with
``W_KV = W_K⁻¹·W_V`` (with biases ``V = (K − b_k)·W_KV + b_v``). The cache holds the keys
before RoPE only — half the bytes of a K/V cache — and RoPE is applied to the cached keys on the
fly. A single decoding step computes ``softmax(q·Kᵀ)·K`` over the *full* key rows (all heads)
and then multiplies by ``W_KV`` (cheaper than rebuilding ``V`` for the whole cache); a longer
chunk rebuilds ``V = K·W_KV`` once.

The kind is named ``slim_softmax``. Trained softmax models are converted exactly with
:func:`jaxblocks.tricks.slim_attention.convert`, which computes ``W_KV`` in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblocks import params as P
from jaxblocks import rope as rope_lib
from jaxblocks import sharding
from jaxblocks.attention import softmax
from jaxblocks.attention.base import AttentionConfig, register
from jaxblocks.context import Context
from jaxblocks.errors import ConfigError


def check_config(d_model: int, cfg: AttentionConfig, prefix: str = "model.attention") -> None:
  """Slim attention needs MHA with a square key projection and no QK-norm."""
  n, h = cfg.n_heads, cfg.dim(d_model)
  if cfg.kv_heads() != n:
    raise ConfigError(f"{prefix}.n_kv_heads", f"slim attention needs multi-head attention "
                      f"(n_kv_heads == n_heads={n}), got {cfg.kv_heads()}")
  if n * h != d_model:
    raise ConfigError(f"{prefix}.head_dim", f"slim attention needs a square W_K: n_heads * "
                      f"head_dim must equal d_model={d_model}, got {n} * {h}")
  if cfg.qk_norm != "none":
    raise ConfigError(f"{prefix}.qk_norm", "slim attention needs keys linear in the input; "
                      f"QK-norm '{cfg.qk_norm}' is not")


def specs(d_model: int, cfg: AttentionConfig, init_std: float = 0.02):
  check_config(d_model, cfg)
  s = softmax.specs(d_model, cfg, init_std)
  n, h = cfg.n_heads, cfg.dim(d_model)
  del s["wv"]
  s["w_kv"] = P.ParamSpec((n, h, n, h), (None, None, "heads", "head_dim"),
                          P.normal(d_model ** -0.5))
  return s


def _values_from_keys(params, k_raw_bsnh):
  """``V = (K − b_k)·W_KV + b_v`` for raw (pre-RoPE) keys."""
  k = k_raw_bsnh - params["bk"] if "bk" in params else k_raw_bsnh
  v = jnp.einsum("bsmj,mjnh->bsnh", k, params["w_kv"].astype(k.dtype))
  return v + params["bv"] if "bv" in params else v


def apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  """Softmax self-attention whose values are derived from the keys (K-only cache)."""
  if x_btd.ndim != 3:
    raise ValueError(f"slim attention: expected x of shape [batch, time, d], got {x_btd.shape}")
  b, t, _ = x_btd.shape
  q = jnp.einsum("btd,dnh->btnh", x_btd, params["wq"])
  k_raw = jnp.einsum("btd,dnh->btnh", x_btd, params["wk"])
  if "bq" in params:
    q, k_raw = q + params["bq"], k_raw + params["bk"]
  if cache is None:
    o, _ = softmax.attend_with_cache(q, k_raw, _values_from_keys(params, k_raw), cfg, ctx, None)
    return softmax.output_projection(params, o), None

  idx = ctx.cache_index
  ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k_raw.astype(cache["k"].dtype), idx, 1)
  s = ck.shape[1]
  k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  keys_raw = ck.astype(q.dtype)
  if cfg.rope:
    theta = cfg.layer_rope_theta(ctx.layer_idx)
    q = rope_lib.apply_rope(q, ctx.positions, theta, cfg.rotary_fraction)
    keys = rope_lib.apply_rope(keys_raw, k_pos, theta, cfg.rotary_fraction)
  else:
    keys = keys_raw
  mask = softmax._mask(ctx.positions, k_pos, None, None, k_pos < idx + t,
                       cfg.layer_window(ctx.layer_idx))
  scale = q.shape[-1] ** -0.5 if cfg.scale is None else cfg.scale
  probs = softmax.attention_probs(q, keys, mask, scale, cfg.softcap)[:, :, 0]  # [b, n, t, s]
  if t == 1:
    # softmax(q·Kᵀ)·K over full key rows, then W_KV (probabilities sum to one, so biases pass).
    k_centered = keys_raw - params["bk"] if "bk" in params else keys_raw
    pk = jnp.einsum("bnts,bsmj->btnmj", probs, k_centered.astype(jnp.float32))
    o = jnp.einsum("btnmj,mjnh->btnh", pk, params["w_kv"].astype(jnp.float32))
    if "bv" in params:
      o = o + params["bv"].astype(jnp.float32)
  else:
    v = _values_from_keys(params, keys_raw)
    o = jnp.einsum("bnts,bsnh->btnh", probs, v.astype(jnp.float32))
  o = sharding.constrain(o.astype(x_btd.dtype), ("batch", "seq", "heads", "head_dim"))
  return softmax.output_projection(params, o), {"k": ck}


def init_cache(batch: int, max_len: int, d_model: int, cfg: AttentionConfig, dtype=jnp.float32):
  return {"k": jnp.zeros((batch, max_len, cfg.n_heads, cfg.dim(d_model)), dtype)}


register("slim_softmax", specs, apply, init_cache)
