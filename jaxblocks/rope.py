"""Rotary position embeddings (RoPE), with partial rotary and configurable theta.

The rotated part of each head is split into two halves (the "rotate half" / NeoX layout used
by Llama, Gemma, GPT-NeoX and most JAX and PyTorch code): ``x = [x1, x2]`` becomes
``[x1·cos − x2·sin, x2·cos + x1·sin]``. With ``fraction < 1`` only the first
``rotary_dim = fraction · head_dim`` channels rotate (GPT-NeoX/Pythia partial rotary).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_dim(head_dim: int, fraction: float) -> int:
  rd = int(head_dim * fraction)
  return rd - rd % 2


def frequencies(rot_dim: int, theta: float) -> jax.Array:
  """Inverse frequencies ``theta^(-2i/rot_dim)`` for i in [0, rot_dim/2)."""
  return 1.0 / (theta ** (jnp.arange(0, rot_dim, 2, dtype=jnp.float32) / rot_dim))


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, theta: float = 10000.0,
               fraction: float = 1.0) -> jax.Array:
  """Rotate ``x[batch, time, heads, head_dim]`` by ``positions[batch, time]``."""
  if x_btnh.ndim != 4:
    raise ValueError(f"apply_rope: expected x of shape [batch, time, heads, head_dim], got {x_btnh.shape}")
  if positions_bt.shape != x_btnh.shape[:2]:
    raise ValueError(f"apply_rope: positions shape {positions_bt.shape} does not match "
                     f"x's [batch, time] = {x_btnh.shape[:2]}")
  head_dim = x_btnh.shape[-1]
  rd = rotary_dim(head_dim, fraction)
  if rd == 0:
    return x_btnh
  inv = frequencies(rd, theta)
  angles = positions_bt.astype(jnp.float32)[..., None] * inv  # [b, t, rd/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x_btnh.astype(jnp.float32)
  x_rot, x_pass = x32[..., :rd], x32[..., rd:]
  x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass], axis=-1)
  return out.astype(x_btnh.dtype)
