"""What the kernels compute on one block of rows, shared by the TPU and GPU kernels.

A block is a float32 ``(rows, width)`` tile of the residual stream ``h`` (already the stored,
rounded residual). On GPU the width is padded to a power of two, so callers pass ``col_mask``
(``(1, width)`` booleans, True on real columns; padded columns must hold zeros); on TPU the block
is the full row and ``col_mask`` is None. ``n_cols`` is the true width used for the means.

The formulas are the derivative of :mod:`jaxblocks.kernels.norm.reference`; the kernels are tested
against that reference's autodiff.

Forward, with ``n = normalize(h)``, ``z = n * w + b``, ``y = z * swish(g)``.
Backward, given ``dy`` and the residual-stream cotangent ``dr``::

    dz = dy * swish(g);  dg = dy * z * swish'(g),  swish'(g) = s + g s (1 - s),  s = sigmoid(g)
    dw = sum_rows(dz * n);  db = sum_rows(dz);  dn = dz * w
    rms:   dh = rstd * (dn - n * mean(dn * n)) + dr
    layer: dh = rstd * (dn - mean(dn) - n * mean(dn * n)) + dr
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """Static description of one fused norm call (hashable; drives kernel signatures).

  kind: ``"rms"`` or ``"layer"``. ``has_*``: which optional operands are present.
  x_dtype: dtype of ``x`` and of ``y``. residual_in_dtype: dtype of the ``residual`` operand (its
  gradient's dtype). residual_dtype: dtype of the new residual stream (what the norm reads).
  """

  kind: str
  eps: float
  has_residual: bool
  has_weight: bool
  has_bias: bool
  has_gate: bool
  x_dtype: str
  residual_in_dtype: str
  residual_dtype: str

  @property
  def writes_residual(self) -> bool:
    """Whether the forward kernel must store the residual stream (else it is ``x`` itself)."""
    return self.has_residual or np.dtype(self.residual_dtype) != np.dtype(self.x_dtype)

  @property
  def separate_residual_grad(self) -> bool:
    """Whether ``d residual`` needs its own output (its dtype differs from ``dx``'s)."""
    return self.has_residual and np.dtype(self.residual_in_dtype) != np.dtype(self.x_dtype)

  # The operand and result lists of the kernels: every backend's kernels take and return the
  # present ones in this order (absent ones are None after unpacking).

  def forward_refs(self, refs):
    """``(x, residual, weight, bias, gate, y, new_residual, mean, rstd)`` refs of a forward
    kernel."""
    return _present(refs, (True, self.has_residual, self.has_weight, self.has_bias,
                           self.has_gate, True, self.writes_residual, self.kind == "layer", True))

  def forward_results(self, outs):
    """``(y, new_residual, mean, rstd)`` from the forward ``pallas_call`` results."""
    return _present(outs, (True, self.writes_residual, self.kind == "layer", True))

  def backward_refs(self, refs):
    """``(h, gate, weight, bias, mean, rstd, dy, d_new_residual, dx, d_residual, d_gate,
    d_weight_partial, d_bias_partial)`` refs of a backward kernel (the bias is read only to
    recompute a gated output)."""
    return _present(refs, (True, self.has_gate, self.has_weight,
                           self.has_bias and self.has_gate, self.kind == "layer", True, True,
                           self.writes_residual, True, self.separate_residual_grad,
                           self.has_gate, self.has_weight, self.has_bias))

  def backward_results(self, outs):
    """``(dx, d_residual, d_gate, d_weight_partials, d_bias_partials)`` from the backward
    ``pallas_call`` results."""
    return _present(outs, (True, self.separate_residual_grad, self.has_gate, self.has_weight,
                           self.has_bias))


def _present(items, flags):
  """``items`` (the present entries, in order) spread over ``flags`` with None for absent ones."""
  items = list(items)
  if len(items) != sum(flags):
    raise ValueError(f"norm kernels: {len(items)} operands for a signature of {sum(flags)}")
  it = iter(items)
  return tuple(next(it) if flag else None for flag in flags)


def _sigmoid(g32):
  return 1.0 / (1.0 + jnp.exp(-g32))


def _row_mean(v, n_cols):
  return jnp.sum(v, axis=-1, keepdims=True) * (1.0 / n_cols)


def statistics(h32, kind: str, eps: float, n_cols: int, col_mask=None):
  """``(mean, rstd)`` per row, each ``(rows, 1)`` float32; ``mean`` is None for RMSNorm."""
  if kind == "rms":
    return None, jax.lax.rsqrt(_row_mean(h32 * h32, n_cols) + eps)
  mean = _row_mean(h32, n_cols)
  centred = h32 - mean
  if col_mask is not None:
    centred = jnp.where(col_mask, centred, 0.0)
  return mean, jax.lax.rsqrt(_row_mean(centred * centred, n_cols) + eps)


def normalized(h32, mean, rstd, col_mask=None):
  """``n`` from saved statistics (zero on padded columns)."""
  n = (h32 if mean is None else h32 - mean) * rstd
  if col_mask is not None and mean is not None:
    n = jnp.where(col_mask, n, 0.0)
  return n


def forward(h32, w32, b32, g32, spec: NormSpec, n_cols: int, col_mask=None):
  """``(y32, mean, rstd)`` for a block; ``w32``/``b32`` are ``(1, width)`` or None."""
  mean, rstd = statistics(h32, spec.kind, spec.eps, n_cols, col_mask)
  z = normalized(h32, mean, rstd, col_mask)
  if w32 is not None:
    z = z * w32
  if b32 is not None:
    z = z + b32
  if g32 is not None:
    z = z * (g32 * _sigmoid(g32))
  return z, mean, rstd


def backward(h32, w32, b32, g32, mean, rstd, dy32, dr32, spec: NormSpec, n_cols: int,
             col_mask=None):
  """``(dh32, dw_rows, db_rows, dg32)`` for a block.

  ``dw_rows``/``db_rows`` are the per-element contributions ``dz * n`` and ``dz`` (callers sum
  them over valid rows); entries are None where the operand is absent. ``dr32`` may be None;
  ``b32`` is only needed (and only passed) with a gate.
  """
  n = normalized(h32, mean, rstd, col_mask)
  dz = dy32
  dg = None
  if g32 is not None:
    s = _sigmoid(g32)
    z = n if w32 is None else n * w32
    if b32 is not None:
      z = z + b32
    dz = dy32 * (g32 * s)
    dg = dy32 * z * (s + g32 * s * (1.0 - s))
  dw_rows = dz * n if spec.has_weight else None
  db_rows = dz if spec.has_bias else None
  dn = dz if w32 is None else dz * w32
  proj = _row_mean(dn * n, n_cols)
  if spec.kind == "rms":
    dh = rstd * (dn - n * proj)
  else:
    dh = rstd * (dn - _row_mean(dn, n_cols) - n * proj)
  if dr32 is not None:
    dh = dh + dr32
  return dh, dw_rows, db_rows, dg
