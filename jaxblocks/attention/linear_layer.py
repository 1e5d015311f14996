"""What the linear-attention layers (gla.py, linear.py) share: the optional short convolution on
q/k/v, running the operator in the configured form or against a decoding state, and the layout
of that decoding state.

Decoding state of a linear kind (its "cache", constant size per token)::

    {"state": float32 [batch, kv_heads, key_dim, value_dim],      # the recurrent state S
     "conv"?: {"q": [batch, W-1, heads, key_dim], "k": ..., "v": ...}}   # short-conv windows

Training / full-sequence calls (no cache) use ``cfg.form``; a call with a cache (prefill of any
length, or one decoding token) starts from ``cache["state"]``: several tokens use the chunkwise
form, a single token the recurrent step, and the final state becomes the new cache.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxblocks.attention import linear_ops, short_conv
from jaxblocks.attention.linear_config import LinearCommonConfig
from jaxblocks.context import Context


def qkv_channels(n_heads: int, n_kv_heads: int, key_dim: int, value_dim: int):
  """Channel shapes and logical axes of q, k, v (for the short-convolution kernels/windows)."""
  return {"q": ((n_heads, key_dim), ("heads", "head_dim")),
          "k": ((n_kv_heads, key_dim), ("kv_heads", "head_dim")),
          "v": ((n_kv_heads, value_dim), ("kv_heads", "head_dim"))}


def conv_specs(common: LinearCommonConfig, channels):
  return short_conv.specs(common.conv_size, channels) if common.short_conv else {}


def maybe_short_conv(params, q, k, v, common: LinearCommonConfig, ctx: Context, cache):
  """SiLU(causal depthwise conv) on q, k, v when ``common.short_conv``; returns
  ``(q, k, v, new_windows)`` (windows None without a cache or without the option)."""
  if not common.short_conv:
    return q, k, v, None
  windows = None if cache is None else cache["conv"]
  outs, new = short_conv.apply(params["conv"], {"q": q, "k": k, "v": v}, windows=windows,
                               segment_ids=None if cache is not None else ctx.segment_ids)
  if cache is None:
    new = None
  else:
    new = {name: w.astype(cache["conv"][name].dtype) for name, w in new.items()}
  return outs["q"], outs["k"], outs["v"], new


def mix(q, k, v, log_g, common: LinearCommonConfig, ctx: Context, cache, scale):
  """Run the operator: ``(o, new_state)`` (new_state None without a cache). Multi-token chunkwise
  calls go through :func:`jaxblocks.kernels.gla.api.chunk_gla` with ``common.impl``."""
  from jaxblocks.kernels.gla import api as gla_kernels  # deferred: the kernels import this package

  chunked = dict(scale=scale, chunk_size=common.chunk_size, sub_chunk=common.sub_chunk,
                 impl=common.impl)
  if cache is None:
    if common.form == "chunk" and q.shape[1] > 1:
      o, _ = gla_kernels.chunk_gla(q, k, v, log_g, segment_ids=ctx.segment_ids, **chunked)
    else:
      o, _ = linear_ops.run(common.form, q, k, v, log_g, scale=scale,
                            segment_ids=ctx.segment_ids, chunk_size=common.chunk_size,
                            sub_chunk=common.sub_chunk)
    return o, None
  if q.shape[1] > 1:
    return gla_kernels.chunk_gla(q, k, v, log_g, initial_state=cache["state"], **chunked)
  o, state = linear_ops.run("chunk", q, k, v, log_g, initial_state=cache["state"], scale=scale,
                            chunk_size=common.chunk_size, sub_chunk=common.sub_chunk)
  return o, state


def new_cache(state, windows):
  """Assemble the decoding state returned by a layer."""
  if state is None:
    return None
  out = {"state": state}
  if windows is not None:
    out["conv"] = windows
  return out


def init_cache(batch: int, common: LinearCommonConfig, n_kv_heads: int, key_dim: int,
               state_value_dim: int, channels, dtype):
  """Zero decoding state: float32 recurrent state plus short-conv windows in ``dtype``."""
  out = {"state": jnp.zeros((batch, n_kv_heads, key_dim, state_value_dim), jnp.float32)}
  if common.short_conv:
    out["conv"] = short_conv.init_windows(batch, common.conv_size, channels, dtype)
  return out
