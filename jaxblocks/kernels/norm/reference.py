"""XLA reference for the fused residual-add + normalization (+ output gate).

The semantics every kernel in this package reproduces, on arrays of any rank (normalising over the
last axis)::

    new_residual = (x + residual).astype(residual_dtype)        # the residual stream
    n            = normalize(new_residual)                       # float32 statistics
    z            = n * (scale_offset + weight) + bias            # weight / bias optional
    y            = (z * swish(gate)).astype(x.dtype)             # gate optional

``normalize`` is :func:`jaxblocks.norms.rms_normalize` (``kind="rms"``) or
:func:`jaxblocks.norms.layer_normalize` (``kind="layer"``), and the affine step is
:func:`jaxblocks.norms.apply_affine`, so this module adds no normalization math of its own. The
norm is applied to the residual stream *as stored* (rounded to ``residual_dtype``), which makes the
fused op equal to the unfused ``r = x + residual; y = norm(r)`` bit for bit in the statistics.
Without ``residual`` the op is a plain norm of ``x``. Gradients come from JAX autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxblocks import norms

KINDS = ("rms", "layer")


def normalize(h: jax.Array, kind: str, eps: float) -> jax.Array:
  """Float32 normalised ``h`` for ``kind`` in :data:`KINDS`."""
  if kind == "rms":
    return norms.rms_normalize(h, eps)
  if kind == "layer":
    return norms.layer_normalize(h, eps)
  raise ValueError(f"norm kind must be one of {KINDS}, got {kind!r}")


def swish(g32: jax.Array) -> jax.Array:
  """``g * sigmoid(g)`` (float32 in, float32 out)."""
  return g32 * jax.nn.sigmoid(g32)


def fused_add_norm(x: jax.Array, residual: jax.Array | None = None,
                   weight: jax.Array | None = None, bias: jax.Array | None = None, *,
                   kind: str = "rms", eps: float = 1e-6, scale_offset: float = 0.0,
                   gate: jax.Array | None = None, residual_dtype=None
                   ) -> tuple[jax.Array, jax.Array]:
  """Reference ``(y, new_residual)``; see the module docstring for the formula.

  ``residual_dtype`` defaults to ``residual.dtype`` (``x.dtype`` without a residual). Without a
  residual, ``new_residual`` is ``x`` cast to ``residual_dtype``.
  """
  if residual_dtype is None:
    residual_dtype = (residual if residual is not None else x).dtype
  h32 = x.astype(jnp.float32)
  if residual is not None:
    h32 = h32 + residual.astype(jnp.float32)
  new_residual = h32.astype(residual_dtype)
  affine = {}
  if weight is not None:
    affine["scale"] = weight
  if bias is not None:
    affine["bias"] = bias
  z32 = norms.apply_affine(affine, normalize(new_residual, kind, eps),
                           norms.NormConfig(scale_offset=scale_offset))
  if gate is not None:
    z32 = z32 * swish(gate.astype(jnp.float32))
  return z32.astype(x.dtype), new_residual
