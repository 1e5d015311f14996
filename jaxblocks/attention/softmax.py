"""Causal softmax self-attention: MHA / GQA / MQA, RoPE, QK-norm, sliding window, KV cache.

``attend`` is the core operator; ``impl`` selects ``jax.nn.dot_product_attention`` (XLA or
cuDNN) or the plain-einsum reference it is tested against. The layer (``specs``/``apply``) adds
projections, QK-norm, RoPE and the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblocks import norms
from jaxblocks import params as P
from jaxblocks import rope as rope_lib
from jaxblocks import sharding
from jaxblocks.attention.base import AttentionConfig, register
from jaxblocks.context import Context

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def _mask(q_pos_bt, k_pos_bs, q_seg_bt, k_seg_bs, k_valid_bs, window):
  """Boolean ``[batch, 1, t, s]`` mask: causal, windowed, same segment, valid key."""
  qp = q_pos_bt[:, None, :, None]
  kp = k_pos_bs[:, None, None, :]
  m = kp <= qp
  if window is not None:
    m = m & (qp - kp < window)
  if q_seg_bt is not None:
    m = m & (q_seg_bt[:, None, :, None] == k_seg_bs[:, None, None, :])
  if k_valid_bs is not None:
    m = m & k_valid_bs[:, None, None, :]
  return m


def attention_probs(q_btnh, k_bskh, mask_b1ts, scale, softcap=None):
  """Float32 softmax probabilities ``[b, kv_heads, groups, t, s]`` of masked attention."""
  b, t, n, h = q_btnh.shape
  kh = k_bskh.shape[2]
  q = q_btnh.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k_bskh, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = jnp.where(mask_b1ts[:, :, None], logits, _NEG)
  return jax.nn.softmax(logits, axis=-1)


def attend_reference(q_btnh, k_bskh, v_bskh, mask_b1ts, scale, softcap=None):
  """Masked softmax attention with float32 logits and softmax (the ground truth)."""
  b, t, n, _ = q_btnh.shape
  probs = attention_probs(q_btnh, k_bskh, mask_b1ts, scale, softcap)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v_bskh.dtype), v_bskh,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, v_bskh.shape[-1]).astype(q_btnh.dtype)


def _choose_impl(impl: str, q, softcap, has_cache: bool) -> str:
  if impl != "auto":
    return impl
  if softcap is not None or has_cache:
    return "reference"
  if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and (
      q.shape[-1] % 8 == 0 and q.shape[-1] <= 128):
    return "cudnn"
  return "xla"


def attend(q_btnh, k_bskh, v_bskh, *, q_positions_bt, k_positions_bs, q_segment_ids=None,
           k_segment_ids=None, k_valid_bs=None, window=None, softcap=None, scale=None,
           impl="auto", has_cache=False):
  """Causal attention of queries over keys/values given absolute positions.

  Shapes: q ``[b, t, n, h]``, k/v ``[b, s, k, h]`` with ``n % k == 0``. Returns ``[b, t, n, h]``.
  """
  b, t, n, h = q_btnh.shape
  if k_bskh.shape[0] != b or k_bskh.shape[-1] != h or v_bskh.shape[:3] != k_bskh.shape[:3]:
    raise ValueError(f"attend: incompatible shapes q {q_btnh.shape}, k {k_bskh.shape}, "
                     f"v {v_bskh.shape}")
  if n % k_bskh.shape[2]:
    raise ValueError(f"attend: query heads {n} not divisible by key/value heads {k_bskh.shape[2]}")
  scale = h ** -0.5 if scale is None else scale
  impl = _choose_impl(impl, q_btnh, softcap, has_cache)
  mask = _mask(q_positions_bt, k_positions_bs, q_segment_ids, k_segment_ids, k_valid_bs, window)
  if impl == "reference":
    return attend_reference(q_btnh, k_bskh, v_bskh, mask, scale, softcap)
  if softcap is not None:
    raise ValueError(f"attention impl '{impl}' does not support softcap; use 'reference' or 'auto'")
  if impl == "cudnn":
    # cuDNN takes the causal/window structure natively, plus a segment mask when packed.
    seg_mask = None
    if q_segment_ids is not None:
      seg_mask = q_segment_ids[:, None, :, None] == k_segment_ids[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=seg_mask, scale=scale, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0), implementation="cudnn")
  return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask, scale=scale,
                                      implementation="xla")


# ----------------------------------------------------------------------------- the layer


def specs(d_model: int, cfg: AttentionConfig, init_std: float = 0.02, out_std: float | None = None):
  n, k, h = cfg.n_heads, cfg.kv_heads(), cfg.dim(d_model)
  out_std = init_std if out_std is None else out_std
  s = {
      "wq": P.ParamSpec((d_model, n, h), ("embed", "heads", "head_dim"), P.normal(init_std)),
      "wk": P.ParamSpec((d_model, k, h), ("embed", "kv_heads", "head_dim"), P.normal(init_std)),
      "wv": P.ParamSpec((d_model, k, h), ("embed", "kv_heads", "head_dim"), P.normal(init_std)),
      "wo": P.ParamSpec((n, h, d_model), ("heads", "head_dim", "embed"), P.normal(out_std)),
  }
  if cfg.bias:
    s["bq"] = P.ParamSpec((n, h), ("heads", "head_dim"), P.zeros)
    s["bk"] = P.ParamSpec((k, h), ("kv_heads", "head_dim"), P.zeros)
    s["bv"] = P.ParamSpec((k, h), ("kv_heads", "head_dim"), P.zeros)
  if cfg.out_bias:
    s["bo"] = P.ParamSpec((d_model,), ("embed",), P.zeros)
  if cfg.qk_norm == "head":
    gain = P.constant(1.0 - cfg.qk_norm_offset)
    s["q_norm"] = P.ParamSpec((h,), ("head_dim",), gain)
    s["k_norm"] = P.ParamSpec((h,), ("head_dim",), gain)
  elif cfg.qk_norm == "full":
    gain = P.constant(1.0 - cfg.qk_norm_offset)
    s["q_norm"] = P.ParamSpec((n, h), ("heads", "head_dim"), gain)
    s["k_norm"] = P.ParamSpec((k, h), ("kv_heads", "head_dim"), gain)
  return s


def _qk_normalize(x_btnh, scale, mode, eps, offset=0.0):
  scale = offset + scale.astype(jnp.float32)
  if mode == "head":
    y = norms.rms_normalize(x_btnh, eps) * scale
  else:  # "full": one statistic over every head of the token
    b, t, n, h = x_btnh.shape
    y = norms.rms_normalize(x_btnh.reshape(b, t, n * h), eps).reshape(b, t, n, h)
    y = y * scale
  return y.astype(x_btnh.dtype)


def qkv_before_rope(params, x_btd, cfg: AttentionConfig, input_scale_bt1=None):
  """Queries, keys and values after projections, biases and QK-norm, before RoPE.

  Everything here is a per-token function of ``x`` (what the first-layer precompute tabulates).
  ``input_scale_bt1`` multiplies the projections (deferred normalisation).
  """
  q = jnp.einsum("btd,dnh->btnh", x_btd, params["wq"])
  k = jnp.einsum("btd,dkh->btkh", x_btd, params["wk"])
  v = jnp.einsum("btd,dkh->btkh", x_btd, params["wv"])
  if input_scale_bt1 is not None:  # deferred normalisation: (x·W)/RMS(x) = (x/RMS(x))·W
    if "bq" in params:
      raise ValueError("softmax attention: deferred normalisation needs bias-free query/key/"
                       "value projections (model.attention.bias=false)")
    s = input_scale_bt1[..., None]
    q, k, v = ((a * s).astype(x_btd.dtype) for a in (q, k, v))
  if "bq" in params:
    q, k, v = q + params["bq"], k + params["bk"], v + params["bv"]
  if cfg.qk_norm != "none":
    q = _qk_normalize(q, params["q_norm"], cfg.qk_norm, cfg.qk_norm_eps, cfg.qk_norm_offset)
    k = _qk_normalize(k, params["k_norm"], cfg.qk_norm, cfg.qk_norm_eps, cfg.qk_norm_offset)
  return q, k, v


def rotate_and_constrain(q, k, v, cfg: AttentionConfig, positions_bt, layer_idx=0):
  """RoPE on queries and keys (when configured; ``layer_idx`` picks the theta when it differs
  per layer, see ``AttentionConfig.layer_rope_theta``) plus activation sharding constraints."""
  if cfg.rope:
    theta = cfg.layer_rope_theta(layer_idx)
    q = rope_lib.apply_rope(q, positions_bt, theta, cfg.rotary_fraction)
    k = rope_lib.apply_rope(k, positions_bt, theta, cfg.rotary_fraction)
  q = sharding.constrain(q, ("batch", "seq", "heads", "head_dim"))
  k = sharding.constrain(k, ("batch", "seq", "kv_heads", "head_dim"))
  v = sharding.constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
  return q, k, v


def project_qkv(params, x_btd, cfg: AttentionConfig, positions_bt, layer_idx=0):
  """Queries, keys and values after biases, QK-norm and RoPE."""
  q, k, v = qkv_before_rope(params, x_btd, cfg)
  return rotate_and_constrain(q, k, v, cfg, positions_bt, layer_idx)


def output_projection(params, o_btnh):
  y = jnp.einsum("btnh,nhd->btd", o_btnh, params["wo"])
  if "bo" in params:
    y = y + params["bo"]
  return y


def impl_for_window(cfg: AttentionConfig, window) -> str:
  """``cfg.impl``, except that a traced per-layer window under ``auto`` selects ``xla`` (it is a
  mask, not cuDNN's static window)."""
  if cfg.impl == "auto" and cfg.softcap is None and window is not None and not isinstance(
      window, int):
    return "xla"
  return cfg.impl


def attend_with_cache(q_btnh, k_btkh, v_btkh, cfg: AttentionConfig, ctx: Context, cache=None):
  """Attention of projected (pre-RoPE) queries/keys/values: RoPE, optional KV-cache write at
  ``ctx.cache_index`` and causal attention. Returns ``(o_btnh, new_cache)``."""
  q, k, v = rotate_and_constrain(q_btnh, k_btkh, v_btkh, cfg, ctx.positions, ctx.layer_idx)
  window = cfg.layer_window(ctx.layer_idx)
  impl = impl_for_window(cfg, window)
  if cache is None:
    o = attend(q, k, v, q_positions_bt=ctx.positions, k_positions_bs=ctx.positions,
               q_segment_ids=ctx.segment_ids, k_segment_ids=ctx.segment_ids,
               window=window, softcap=cfg.softcap, scale=cfg.scale, impl=impl)
    new_cache = None
  else:
    idx = ctx.cache_index
    ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), idx, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), idx, axis=1)
    b, s = ck.shape[:2]
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_valid = k_pos < idx + q.shape[1]
    o = attend(q, ck.astype(q.dtype), cv.astype(q.dtype), q_positions_bt=ctx.positions,
               k_positions_bs=k_pos, k_valid_bs=k_valid, window=window,
               softcap=cfg.softcap, scale=cfg.scale,
               impl="reference" if cfg.impl == "auto" else cfg.impl, has_cache=True)
    new_cache = {"k": ck, "v": cv}
  return sharding.constrain(o, ("batch", "seq", "heads", "head_dim")), new_cache


def apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  """Self-attention of ``x[batch, time, d]``; with ``cache`` new keys/values are written at
  ``ctx.cache_index`` and the queries attend over the whole cache."""
  if x_btd.ndim != 3:
    raise ValueError(f"softmax attention: expected x of shape [batch, time, d], got {x_btd.shape}")
  q, k, v = qkv_before_rope(params, x_btd, cfg, ctx.extras.get("input_scale"))
  o, new_cache = attend_with_cache(q, k, v, cfg, ctx, cache)
  return output_projection(params, o), new_cache


def init_cache(batch: int, max_len: int, d_model: int, cfg: AttentionConfig, dtype=jnp.float32):
  shape = (batch, max_len, cfg.kv_heads(), cfg.dim(d_model))
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def cache_axes():
  axes = ("batch", None, "kv_heads", "head_dim")
  return {"k": axes, "v": axes}


register("softmax", specs, apply, init_cache)
