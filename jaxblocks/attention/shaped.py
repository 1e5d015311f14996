"""Shaped attention (He & Hofmann, "Simplifying Transformer Blocks", ICLR 2024).

Per head ``A = β·softmax(QKᵀ/sqrt(dk) + M) + α·I − γ·C`` where ``M`` is the causal mask, ``I``
the identity and ``C`` the causal uniform matrix (``C_ij = 1/i`` for ``j ≤ i``, 1-based ``i``;
in general uniform over the keys a query may see, so with packed segments or a sliding window
it equals ``softmax`` of all-zero logits). ``α, β, γ`` are trainable per head (init 1) and
``W_Q`` is initialised to zero, so ``A = I`` at initialisation.

Values and the output projection are identities times trainable scalars (``v_gain``,
``o_gain``): the head outputs are ``A_h X_h`` with ``X`` split into heads, which requires
``n_heads · head_dim == d_model``. A model may keep a full value matrix in its first layer: the
``SAS`` topologies store it model-wide and hand it in as ``ctx.extras["first_layer_value"]``.

The computation never materialises ``A``: it is ``β·attend(Q, K, V) + α·V − γ·C·V``, with the
softmax part through :func:`jaxblocks.attention.softmax.attend` (flash/cuDNN capable).
:func:`attention_matrix` builds ``A`` explicitly for inspection and tests.
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

FIRST_LAYER_VALUE = "first_layer_value"


def _check(d_model: int, cfg: AttentionConfig):
  n, h = cfg.n_heads, cfg.dim(d_model)
  if n * h != d_model:
    raise ConfigError("model.attention.head_dim", f"shaped attention uses identity values, so "
                      f"n_heads * head_dim must equal d_model={d_model}; got {n} * {h}")
  if cfg.kv_heads() != n:
    raise ConfigError("model.attention.n_kv_heads", f"shaped attention is multi-head (one key "
                      f"head per query head); got n_kv_heads={cfg.kv_heads()} for n_heads={n}")
  if cfg.qk_norm != "none" or cfg.bias or cfg.out_bias or cfg.softcap is not None:
    raise ConfigError("model.attention", "shaped attention supports none of qk_norm, bias, "
                      "out_bias, softcap")


def specs(d_model: int, cfg: AttentionConfig, init_std: float = 0.02):
  _check(d_model, cfg)
  n, h = cfg.n_heads, cfg.dim(d_model)
  return {
      "wq": P.ParamSpec((d_model, n, h), ("embed", "heads", "head_dim"), P.zeros),
      "wk": P.ParamSpec((d_model, n, h), ("embed", "heads", "head_dim"), P.normal(init_std)),
      "alpha": P.ParamSpec((n,), ("heads",), P.ones),
      "beta": P.ParamSpec((n,), ("heads",), P.ones),
      "gamma": P.ParamSpec((n,), ("heads",), P.ones),
      "v_gain": P.ParamSpec((), (), P.ones),
      "o_gain": P.ParamSpec((), (), P.ones),
  }


def first_layer_value_spec(d_model: int, cfg: AttentionConfig, init_std: float = 0.02):
  """The optional full value matrix of layer 0."""
  n, h = cfg.n_heads, cfg.dim(d_model)
  return P.ParamSpec((d_model, n, h), ("embed", "heads", "head_dim"), P.normal(init_std))


def _values(params, x_btd, cfg: AttentionConfig, ctx: Context):
  b, t, d = x_btd.shape
  n, h = cfg.n_heads, cfg.dim(d)
  identity = x_btd.reshape(b, t, n, h)
  w0 = ctx.extras.get(FIRST_LAYER_VALUE)
  if w0 is not None:
    full = lambda: jnp.einsum("btd,dnh->btnh", x_btd, w0.astype(x_btd.dtype))
    if isinstance(ctx.layer_idx, int):
      v = full() if ctx.layer_idx == 0 else identity
    else:  # traced inside the layer scan: only one branch runs
      v = jax.lax.cond(ctx.layer_idx == 0, full, lambda: identity)
  else:
    v = identity
  return v * params["v_gain"].astype(x_btd.dtype)


def _centering(mask_b1ts):
  """``C`` as float32 ``[b, 1, t, s]``: uniform over the visible keys of each query."""
  m = mask_b1ts.astype(jnp.float32)
  return m / jnp.maximum(jnp.sum(m, axis=-1, keepdims=True), 1.0)


def _qk(params, x_btd, cfg, positions, layer_idx=0):
  q = jnp.einsum("btd,dnh->btnh", x_btd, params["wq"])
  k = jnp.einsum("btd,dnh->btnh", x_btd, params["wk"])
  if cfg.rope:
    theta = cfg.layer_rope_theta(layer_idx)
    q = rope_lib.apply_rope(q, positions, theta, cfg.rotary_fraction)
    k = rope_lib.apply_rope(k, positions, theta, cfg.rotary_fraction)
  return q, k


def attention_matrix(params, x_btd, cfg: AttentionConfig, positions_bt, segment_ids_bt=None,
                     layer_idx=0):
  """The explicit shaped attention matrix ``A`` as float32 ``[batch, heads, t, t]``."""
  q, k = _qk(params, x_btd, cfg, positions_bt, layer_idx)
  mask = softmax._mask(positions_bt, positions_bt, segment_ids_bt, segment_ids_bt, None,
                       cfg.layer_window(layer_idx))
  scale = q.shape[-1] ** -0.5 if cfg.scale is None else cfg.scale
  probs = softmax.attention_probs(q, k, mask, scale)[:, :, 0]  # MHA: one query per kv head
  t = x_btd.shape[1]
  eye = jnp.eye(t, dtype=jnp.float32)
  c = _centering(mask)
  f = lambda a: a.astype(jnp.float32)[None, :, None, None]
  return f(params["beta"]) * probs + f(params["alpha"]) * eye - f(params["gamma"]) * c


def apply(params, x_btd, cfg: AttentionConfig, ctx: Context, cache=None):
  """Shaped self-attention of ``x[batch, time, d]`` (with an optional K/V cache)."""
  if x_btd.ndim != 3:
    raise ValueError(f"shaped attention: expected x of shape [batch, time, d], got {x_btd.shape}")
  b, t, d = x_btd.shape
  q, k = _qk(params, x_btd, cfg, ctx.positions, ctx.layer_idx)
  v = _values(params, x_btd, cfg, ctx)
  window = cfg.layer_window(ctx.layer_idx)
  impl = softmax.impl_for_window(cfg, window)
  if cache is None:
    keys, values, k_pos, k_seg, k_valid = k, v, ctx.positions, ctx.segment_ids, None
    o_soft = softmax.attend(q, k, v, q_positions_bt=ctx.positions, k_positions_bs=ctx.positions,
                            q_segment_ids=ctx.segment_ids, k_segment_ids=ctx.segment_ids,
                            window=window, scale=cfg.scale, impl=impl)
    new_cache = None
  else:
    idx = ctx.cache_index
    keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), idx, 1)
    values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), idx, 1)
    s = keys.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    k_seg, k_valid = None, k_pos < idx + t
    keys, values = keys.astype(q.dtype), values.astype(q.dtype)
    o_soft = softmax.attend(q, keys, values, q_positions_bt=ctx.positions, k_positions_bs=k_pos,
                            k_valid_bs=k_valid, window=window, scale=cfg.scale,
                            impl="reference" if cfg.impl == "auto" else cfg.impl, has_cache=True)
    new_cache = {"k": keys.astype(cache["k"].dtype), "v": values.astype(cache["v"].dtype)}
  mask = softmax._mask(ctx.positions, k_pos, ctx.segment_ids if cache is None else None, k_seg,
                       k_valid, window)
  o_center = jnp.einsum("bts,bsnh->btnh", _centering(mask)[:, 0], values.astype(jnp.float32))
  head = lambda a: a.astype(jnp.float32)[:, None]
  o = (head(params["beta"]) * o_soft.astype(jnp.float32) + head(params["alpha"]) * v.astype(
      jnp.float32) - head(params["gamma"]) * o_center)
  o = sharding.constrain(o.astype(x_btd.dtype), ("batch", "seq", "heads", "head_dim"))
  y = o.reshape(b, t, d) * params["o_gain"].astype(x_btd.dtype)
  return y, new_cache


def init_cache(batch: int, max_len: int, d_model: int, cfg: AttentionConfig, dtype=jnp.float32):
  shape = (batch, max_len, cfg.n_heads, cfg.dim(d_model))
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


register("shaped", specs, apply, init_cache)
