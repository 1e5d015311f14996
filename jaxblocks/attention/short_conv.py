"""Causal depthwise convolution over time, used by the linear-attention kinds.

``causal_conv`` is the operator: ``y_t = Σ_{d<W} w[W-1-d] ⊙ x_{t-d}`` per channel, where the
inputs before the sequence come from a ``prefix`` (the last ``W-1`` inputs of the previous call:
the decoding state) and taps never cross a packed-document boundary. The short-convolution
option of the linear kinds applies it, followed by SiLU, to the q, k and v projections.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxblocks import params as P
from jaxblocks.attention.linear_ops import document_index


def conv_init(width: int) -> P.Initializer:
  """Uniform(±1/sqrt(width)): the default initialisation of a depthwise Conv1d (fan_in = width)."""
  bound = 1.0 / math.sqrt(width)

  def init(key, shape, dtype):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  return init


def causal_conv(x, w, *, prefix=None, segment_ids=None):
  """Depthwise causal convolution of ``x[B, T, *channels]`` with ``w[W, *channels]``.

  prefix: ``[B, W-1, *channels]`` inputs preceding ``x`` (zeros when None).
  segment_ids: ``[B, T]``; a tap is dropped when it reaches into an earlier document (the prefix
  counts as part of the first document). Returns ``(y, new_prefix)`` with ``new_prefix`` the last
  ``W-1`` inputs (prefix included), in the dtype of ``x``; ``y`` is computed in float32 and cast
  to the dtype of ``x``.
  """
  width = w.shape[0]
  b, t = x.shape[:2]
  if w.shape[1:] != x.shape[2:]:
    raise ValueError(f"causal_conv: kernel shape {w.shape} does not match channels of x {x.shape}")
  if prefix is None:
    prefix = jnp.zeros((b, width - 1, *x.shape[2:]), x.dtype)
  elif prefix.shape != (b, width - 1, *x.shape[2:]):
    raise ValueError(f"causal_conv: prefix must have shape {(b, width - 1, *x.shape[2:])}, got "
                     f"{prefix.shape}")
  full = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)
  doc = jnp.concatenate([jnp.zeros((b, width - 1), jnp.int32),
                         document_index(segment_ids, b, t)], axis=1)
  w32 = w.astype(jnp.float32)
  y = jnp.zeros(x.shape, jnp.float32)
  expand = (slice(None), slice(None)) + (None,) * (x.ndim - 2)
  for d in range(width):
    start = width - 1 - d
    tap = full[:, start:start + t].astype(jnp.float32) * w32[width - 1 - d]
    if segment_ids is not None and d:
      same = doc[:, start:start + t] == doc[:, width - 1:]
      tap = jnp.where(same[expand], tap, 0.0)
    y = y + tap
  return y.astype(x.dtype), full[:, full.shape[1] - (width - 1):]


def specs(width: int, channels: dict):
  """Kernels ``[W, *shape]`` for each named input; ``channels`` maps name → (shape, axes)."""
  return {name: P.ParamSpec((width, *shape), (None, *axes), conv_init(width))
          for name, (shape, axes) in channels.items()}


def apply(params, inputs: dict, *, windows=None, segment_ids=None):
  """SiLU(causal_conv(x)) for every named input; returns ``(outputs, new_windows)``."""
  outs, new_windows = {}, {}
  for name, x in inputs.items():
    y, new_windows[name] = causal_conv(x, params[name],
                                       prefix=None if windows is None else windows[name],
                                       segment_ids=segment_ids)
    outs[name] = jax.nn.silu(y)
  return outs, new_windows


def init_windows(batch: int, width: int, channels: dict, dtype):
  """Zero decoding windows ``[B, W-1, *shape]`` for each named input."""
  return {name: jnp.zeros((batch, width - 1, *shape), dtype)
          for name, (shape, _) in channels.items()}
