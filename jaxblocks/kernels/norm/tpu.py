"""Pallas Mosaic (TPU) kernels for the fused residual-add + norm, forward and backward.

Layout: 2-D ``(rows, d)`` operands. The grid walks blocks of ``block_rows`` rows; every block
spans the full width ``d`` (a block dimension equal to the array dimension satisfies the
(8, 128) tiling rule for any ``d``; Mosaic pads the lanes internally). ``block_rows`` is a multiple
of 32 (bf16/int8 sublane packing) or all rows; the last block may be partial: its out-of-range
rows are never written and are masked out of the weight/bias gradient sums. Row statistics are
``(rows, 1)`` float32. The weight/bias gradients are per-block partial sums ``(blocks, 1, d)``
reduced outside the kernel, so the row grid stays ``parallel`` (megacore-shardable).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.norm import rows as R
from jaxblocks.kernels.norm.rows import NormSpec

# Scoped-VMEM budget the block size is chosen for, and the limit handed to Mosaic (every TPU
# generation since v4 has at least 64 MiB of VMEM per core).
VMEM_BUDGET_BYTES = 20 * 2**20
VMEM_LIMIT_BYTES = 48 * 2**20
MAX_BLOCK_ROWS = 1024
ROW_ALIGN = 32


def _itemsize(dtype) -> int:
  return np.dtype(dtype).itemsize


def _bytes_per_row(d: int, io_itemsizes: list[int], f32_temps: int) -> int:
  # Every pipelined operand is double-buffered; float32 temporaries live once.
  return d * (2 * sum(io_itemsizes) + 4 * f32_temps)


def choose_block_rows(n_rows: int, d: int, io_itemsizes: list[int], f32_temps: int) -> int | None:
  """Rows per block within the VMEM budget, or None if not even 8 rows fit."""
  per_row = _bytes_per_row(d, io_itemsizes, f32_temps)
  fit = VMEM_BUDGET_BYTES // per_row
  if n_rows <= min(fit, MAX_BLOCK_ROWS):
    return n_rows  # one block covering every row: always a legal block shape
  if fit >= ROW_ALIGN:
    return min(MAX_BLOCK_ROWS, fit) // ROW_ALIGN * ROW_ALIGN
  if fit >= 8:
    return fit // 8 * 8
  return None


def forward_block_rows(spec: NormSpec, n_rows: int, d: int) -> int | None:
  sizes = [_itemsize(spec.x_dtype), _itemsize(spec.x_dtype)]  # x, y
  if spec.has_residual:
    sizes.append(_itemsize(spec.residual_in_dtype))
  if spec.writes_residual:
    sizes.append(_itemsize(spec.residual_dtype))
  if spec.has_gate:
    sizes.append(_itemsize(spec.x_dtype))
  return choose_block_rows(n_rows, d, sizes, f32_temps=4)


def backward_block_rows(spec: NormSpec, n_rows: int, d: int) -> int | None:
  h_dtype = spec.residual_dtype if spec.writes_residual else spec.x_dtype
  sizes = [_itemsize(h_dtype), _itemsize(spec.x_dtype), _itemsize(spec.x_dtype)]  # h, dy, dx
  if spec.writes_residual:
    sizes.append(_itemsize(spec.residual_dtype))  # cotangent of the residual stream
  if spec.separate_residual_grad:
    sizes.append(_itemsize(spec.residual_in_dtype))
  if spec.has_gate:
    sizes += [_itemsize(spec.x_dtype)] * 2  # g, dg
  return choose_block_rows(n_rows, d, sizes, f32_temps=7)


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel",),
                              vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _row_spec(block_rows, d):
  return pl.BlockSpec((block_rows, d), lambda i: (i, 0))


def _stat_spec(block_rows):
  return pl.BlockSpec((block_rows, 1), lambda i: (i, 0))


def _vec_spec(d):
  return pl.BlockSpec((1, d), lambda i: (0, 0))


def _partial_spec(d):
  return pl.BlockSpec((1, 1, d), lambda i: (i, 0, 0))


def _forward_kernel(*refs, spec: NormSpec, n_cols: int):
  (x_ref, res_ref, w_ref, b_ref, g_ref, y_ref, newres_ref, mean_ref,
   rstd_ref) = spec.forward_refs(refs)

  h32 = x_ref[...].astype(jnp.float32)
  if res_ref is not None:
    h32 = h32 + res_ref[...].astype(jnp.float32)
  if newres_ref is not None:
    stored = h32.astype(newres_ref.dtype)
    newres_ref[...] = stored
    h32 = stored.astype(jnp.float32)  # normalise the stream as stored
  w32 = w_ref[...].astype(jnp.float32) if w_ref is not None else None
  b32 = b_ref[...].astype(jnp.float32) if b_ref is not None else None
  g32 = g_ref[...].astype(jnp.float32) if g_ref is not None else None
  y32, mean, rstd = R.forward(h32, w32, b32, g32, spec, n_cols)
  y_ref[...] = y32.astype(y_ref.dtype)
  if mean_ref is not None:
    mean_ref[...] = mean
  rstd_ref[...] = rstd


def forward(x, residual, weight, bias, gate, spec: NormSpec, *, block_rows: int,
            interpret=False):
  """Forward kernel on 2-D operands.

  Returns ``(y, new_residual_or_None, mean_or_None, rstd)`` with statistics ``(rows, 1)`` f32;
  ``weight``/``bias`` are ``(1, d)`` float32 (already offset).
  """
  n_rows, d = x.shape
  grid = (pl.cdiv(n_rows, block_rows),)
  operands, in_specs = [x], [_row_spec(block_rows, d)]
  for present, arr, bspec in ((spec.has_residual, residual, _row_spec(block_rows, d)),
                              (spec.has_weight, weight, _vec_spec(d)),
                              (spec.has_bias, bias, _vec_spec(d)),
                              (spec.has_gate, gate, _row_spec(block_rows, d))):
    if present:
      operands.append(arr)
      in_specs.append(bspec)
  out_shape = [jax.ShapeDtypeStruct((n_rows, d), spec.x_dtype)]
  out_specs = [_row_spec(block_rows, d)]
  if spec.writes_residual:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, d), spec.residual_dtype))
    out_specs.append(_row_spec(block_rows, d))
  n_stats = 2 if spec.kind == "layer" else 1
  out_shape += [jax.ShapeDtypeStruct((n_rows, 1), jnp.float32)] * n_stats
  out_specs += [_stat_spec(block_rows)] * n_stats
  outs = pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, n_cols=d),
      grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(), interpret=interpret,
      name=f"fused_{spec.kind}norm_fwd",
  )(*operands)
  outs = list(outs)
  return spec.forward_results(outs)


def _backward_kernel(*refs, spec: NormSpec, n_cols: int, n_rows: int, block_rows: int):
  (h_ref, g_ref, w_ref, b_ref, mean_ref, rstd_ref, dy_ref, dr_ref, dx_ref, dres_ref, dg_ref,
   dw_ref, db_ref) = spec.backward_refs(refs)

  h32 = h_ref[...].astype(jnp.float32)
  g32 = g_ref[...].astype(jnp.float32) if g_ref is not None else None
  w32 = w_ref[...].astype(jnp.float32) if w_ref is not None else None
  b32 = b_ref[...].astype(jnp.float32) if b_ref is not None else None
  mean = mean_ref[...] if mean_ref is not None else None
  dr32 = dr_ref[...].astype(jnp.float32) if dr_ref is not None else None
  dh, dw_rows, db_rows, dg = R.backward(h32, w32, b32, g32, mean, rstd_ref[...],
                                        dy_ref[...].astype(jnp.float32), dr32, spec, n_cols)
  dx_ref[...] = dh.astype(dx_ref.dtype)
  if dres_ref is not None:
    dres_ref[...] = dh.astype(dres_ref.dtype)
  if dg_ref is not None:
    dg_ref[...] = dg.astype(dg_ref.dtype)
  if dw_ref is None and db_ref is None:
    return
  row = pl.program_id(0) * block_rows + jax.lax.broadcasted_iota(jnp.int32, h32.shape, 0)
  valid = row < n_rows  # the last block may hold out-of-range (garbage) rows

  def block_sum(v):
    return jnp.sum(jnp.where(valid, v, 0.0), axis=0, keepdims=True)[None]

  if dw_ref is not None:
    dw_ref[...] = block_sum(dw_rows)
  if db_ref is not None:
    db_ref[...] = block_sum(db_rows)


def backward(h, gate, weight, bias, mean, rstd, dy, dresidual_out, spec: NormSpec, *,
             block_rows: int, interpret=False):
  """Backward kernel on 2-D operands.

  ``h`` is the stored residual stream (or ``x``); ``dresidual_out`` the cotangent of the new
  residual stream (None unless ``spec.writes_residual``). Returns ``(dx, dresidual_or_None, dgate_or_None,
  dweight_or_None, dbias_or_None)``; ``dresidual`` is None when it equals ``dx`` in value and
  dtype (the caller reuses ``dx``); ``dweight``/``dbias`` are ``(d,)`` float32.
  """
  n_rows, d = h.shape
  n_blocks = pl.cdiv(n_rows, block_rows)
  operands, in_specs = [h], [_row_spec(block_rows, d)]
  for present, arr, bspec in ((spec.has_gate, gate, _row_spec(block_rows, d)),
                              (spec.has_weight, weight, _vec_spec(d)),
                              (spec.has_bias and spec.has_gate, bias, _vec_spec(d)),
                              (spec.kind == "layer", mean, _stat_spec(block_rows)),
                              (True, rstd, _stat_spec(block_rows)),
                              (True, dy, _row_spec(block_rows, d)),
                              (spec.writes_residual, dresidual_out, _row_spec(block_rows, d))):
    if present:
      operands.append(arr)
      in_specs.append(bspec)
  out_shape = [jax.ShapeDtypeStruct((n_rows, d), spec.x_dtype)]
  out_specs = [_row_spec(block_rows, d)]
  if spec.separate_residual_grad:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, d), spec.residual_in_dtype))
    out_specs.append(_row_spec(block_rows, d))
  if spec.has_gate:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, d), spec.x_dtype))
    out_specs.append(_row_spec(block_rows, d))
  n_partials = int(spec.has_weight) + int(spec.has_bias)
  out_shape += [jax.ShapeDtypeStruct((n_blocks, 1, d), jnp.float32)] * n_partials
  out_specs += [_partial_spec(d)] * n_partials
  outs = list(pl.pallas_call(
      functools.partial(_backward_kernel, spec=spec, n_cols=d, n_rows=n_rows,
                        block_rows=block_rows),
      grid=(n_blocks,), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      compiler_params=_compiler_params(), interpret=interpret,
      name=f"fused_{spec.kind}norm_bwd",
  )(*operands))
  dx, dres, dg, dw_partial, db_partial = spec.backward_results(outs)
  dw = None if dw_partial is None else jnp.sum(dw_partial, axis=(0, 1))
  db = None if db_partial is None else jnp.sum(db_partial, axis=(0, 1))
  return dx, dres, dg, dw, db
