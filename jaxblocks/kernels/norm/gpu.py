"""Pallas GPU kernels (Triton lowering) for the fused residual-add + norm, forward and backward.

The Triton lowering is selected explicitly with ``jax.experimental.pallas.triton.CompilerParams``:
jax 0.10 and 0.11 send a ``pallas_call`` without compiler params to Mosaic GPU (flag
``jax_pallas_use_mosaic_gpu``, default True, with a deprecation warning for ``pallas_call``), so
leaving it implicit would change the backend between jax versions.

Operands stay in global memory; each program loads a ``(block_rows, block_cols)`` tile with masked
loads, ``block_cols`` the next power of two >= d (Triton tiles are power-of-two sized), padded
columns read as zero and padded rows are never stored. Forward: one program per row block.
Backward: each program walks ``blocks_per_program`` row blocks, accumulating its weight/bias
gradient in registers and storing one float32 partial row, reduced outside the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.norm import rows as R
from jaxblocks.kernels.norm.rows import NormSpec

# Largest row tile held in registers (elements); wider rows fall back to XLA.
MAX_BLOCK_COLS = 16384
TILE_ELEMENTS = 4096
MAX_BACKWARD_PROGRAMS = 1024


def block_cols(d: int) -> int:
  return pl.next_power_of_2(d)


def supports_width(d: int) -> bool:
  return block_cols(d) <= MAX_BLOCK_COLS


def default_block_rows(d: int) -> int:
  return max(1, min(16, TILE_ELEMENTS // block_cols(d)))


def default_num_warps(block_rows: int, d: int) -> int:
  return max(2, min(16, block_rows * block_cols(d) // 512))


def _compiler_params(block_rows, d, num_warps):
  return pltriton.CompilerParams(num_warps=num_warps or default_num_warps(block_rows, d),
                                 num_stages=1)


def _tile(block_rows, d, row_start, n_rows):
  rows = row_start + jnp.arange(block_rows)
  cols = jnp.arange(block_cols(d))
  row_ok = rows < n_rows
  col_ok = (cols < d)[None, :]
  idx = (rows[:, None], cols[None, :])
  return rows, idx, row_ok, col_ok, row_ok[:, None] & col_ok


def _load(ref, idx, mask):
  return pltriton.load(ref.at[idx], mask=mask, other=0.0).astype(jnp.float32)


def _load_vec(ref, d):
  cols = jnp.arange(block_cols(d))
  return pltriton.load(ref.at[cols], mask=cols < d, other=0.0).astype(jnp.float32)[None, :]


def _forward_kernel(*refs, spec: NormSpec, n_rows: int, d: int, block_rows: int):
  (x_ref, res_ref, w_ref, b_ref, g_ref, y_ref, newres_ref, mean_ref,
   rstd_ref) = spec.forward_refs(refs)

  rows, idx, row_ok, col_ok, mask = _tile(block_rows, d, pl.program_id(0) * block_rows, n_rows)
  h32 = _load(x_ref, idx, mask)
  if res_ref is not None:
    h32 = h32 + _load(res_ref, idx, mask)
  if newres_ref is not None:
    stored = h32.astype(newres_ref.dtype)
    pltriton.store(newres_ref.at[idx], stored, mask=mask)
    h32 = stored.astype(jnp.float32)
  w32 = _load_vec(w_ref, d) if w_ref is not None else None
  b32 = _load_vec(b_ref, d) if b_ref is not None else None
  g32 = _load(g_ref, idx, mask) if g_ref is not None else None
  y32, mean, rstd = R.forward(h32, w32, b32, g32, spec, d, col_ok)
  pltriton.store(y_ref.at[idx], y32.astype(y_ref.dtype), mask=mask)
  if mean_ref is not None:
    pltriton.store(mean_ref.at[rows], mean[:, 0], mask=row_ok)
  pltriton.store(rstd_ref.at[rows], rstd[:, 0], mask=row_ok)


def forward(x, residual, weight, bias, gate, spec: NormSpec, *, block_rows: int | None = None,
            num_warps: int | None = None, interpret=False):
  """Forward kernel on 2-D operands; same contract as :func:`jaxblocks.kernels.norm.tpu.forward`
  except that statistics are ``(rows,)`` and ``weight``/``bias`` are ``(d,)`` float32."""
  n_rows, d = x.shape
  block_rows = block_rows or default_block_rows(d)
  operands = [x] + [a for present, a in ((spec.has_residual, residual), (spec.has_weight, weight),
                                         (spec.has_bias, bias), (spec.has_gate, gate)) if present]
  out_shape = [jax.ShapeDtypeStruct((n_rows, d), spec.x_dtype)]
  if spec.writes_residual:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, d), spec.residual_dtype))
  out_shape += [jax.ShapeDtypeStruct((n_rows,), jnp.float32)] * (2 if spec.kind == "layer" else 1)
  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  outs = list(pl.pallas_call(
      functools.partial(_forward_kernel, spec=spec, n_rows=n_rows, d=d, block_rows=block_rows),
      grid=(pl.cdiv(n_rows, block_rows),),
      in_specs=[anywhere] * len(operands), out_specs=[anywhere] * len(out_shape),
      out_shape=out_shape, compiler_params=_compiler_params(block_rows, d, num_warps),
      interpret=interpret, name=f"fused_{spec.kind}norm_fwd",
  )(*operands))
  return spec.forward_results(outs)


def _backward_kernel(*refs, spec: NormSpec, n_rows: int, d: int, block_rows: int,
                     blocks_per_program: int):
  (h_ref, g_ref, w_ref, b_ref, mean_ref, rstd_ref, dy_ref, dr_ref, dx_ref, dres_ref, dg_ref,
   dw_ref, db_ref) = spec.backward_refs(refs)

  w32 = _load_vec(w_ref, d) if w_ref is not None else None
  b32 = _load_vec(b_ref, d) if b_ref is not None else None
  first_row = pl.program_id(0) * (blocks_per_program * block_rows)
  acc_shape = (block_rows, block_cols(d))

  def body(step, acc):
    dw_acc, db_acc = acc
    rows, idx, row_ok, col_ok, mask = _tile(block_rows, d, first_row + step * block_rows, n_rows)
    h32 = _load(h_ref, idx, mask)
    g32 = _load(g_ref, idx, mask) if g_ref is not None else None
    mean = (pltriton.load(mean_ref.at[rows], mask=row_ok, other=0.0)[:, None]
            if mean_ref is not None else None)
    rstd = pltriton.load(rstd_ref.at[rows], mask=row_ok, other=0.0)[:, None]
    dy32 = _load(dy_ref, idx, mask)
    dr32 = _load(dr_ref, idx, mask) if dr_ref is not None else None
    dh, dw_rows, db_rows, dg = R.backward(h32, w32, b32, g32, mean, rstd, dy32, dr32, spec, d,
                                          col_ok)
    pltriton.store(dx_ref.at[idx], dh.astype(dx_ref.dtype), mask=mask)
    if dres_ref is not None:
      pltriton.store(dres_ref.at[idx], dh.astype(dres_ref.dtype), mask=mask)
    if dg_ref is not None:
      pltriton.store(dg_ref.at[idx], dg.astype(dg_ref.dtype), mask=mask)
    # Padded rows hold rstd = 0 and dy = 0, so their contributions are exact zeros.
    if dw_rows is not None:
      dw_acc = dw_acc + dw_rows
    if db_rows is not None:
      db_acc = db_acc + db_rows
    return dw_acc, db_acc

  zeros = jnp.zeros(acc_shape, jnp.float32)
  dw_acc, db_acc = jax.lax.fori_loop(0, blocks_per_program, body, (zeros, zeros))
  cols = jnp.arange(block_cols(d))
  if dw_ref is not None:
    pltriton.store(dw_ref.at[pl.program_id(0), cols], jnp.sum(dw_acc, axis=0), mask=cols < d)
  if db_ref is not None:
    pltriton.store(db_ref.at[pl.program_id(0), cols], jnp.sum(db_acc, axis=0), mask=cols < d)


def backward(h, gate, weight, bias, mean, rstd, dy, dresidual_out, spec: NormSpec, *,
             block_rows: int | None = None, num_warps: int | None = None, interpret=False):
  """Backward kernel on 2-D operands; same contract as
  :func:`jaxblocks.kernels.norm.tpu.backward` (statistics ``(rows,)``, ``weight`` ``(d,)``)."""
  n_rows, d = h.shape
  block_rows = block_rows or default_block_rows(d)
  n_blocks = pl.cdiv(n_rows, block_rows)
  blocks_per_program = pl.cdiv(n_blocks, MAX_BACKWARD_PROGRAMS)
  n_programs = pl.cdiv(n_blocks, blocks_per_program)
  operands = [h] + [a for present, a in (
      (spec.has_gate, gate), (spec.has_weight, weight), (spec.has_bias and spec.has_gate, bias),
      (spec.kind == "layer", mean), (True, rstd), (True, dy),
      (spec.writes_residual, dresidual_out)) if present]
  out_shape = [jax.ShapeDtypeStruct((n_rows, d), spec.x_dtype)]
  if spec.separate_residual_grad:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, d), spec.residual_in_dtype))
  if spec.has_gate:
    out_shape.append(jax.ShapeDtypeStruct((n_rows, d), spec.x_dtype))
  out_shape += ([jax.ShapeDtypeStruct((n_programs, d), jnp.float32)]
                * (int(spec.has_weight) + int(spec.has_bias)))
  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  outs = list(pl.pallas_call(
      functools.partial(_backward_kernel, spec=spec, n_rows=n_rows, d=d, block_rows=block_rows,
                        blocks_per_program=blocks_per_program),
      grid=(n_programs,), in_specs=[anywhere] * len(operands),
      out_specs=[anywhere] * len(out_shape), out_shape=out_shape,
      compiler_params=_compiler_params(block_rows, d, num_warps),
      interpret=interpret, name=f"fused_{spec.kind}norm_bwd",
  )(*operands))
  dx, dres, dg, dw_partial, db_partial = spec.backward_results(outs)
  dw = None if dw_partial is None else jnp.sum(dw_partial, axis=0)
  db = None if db_partial is None else jnp.sum(db_partial, axis=0)
  return dx, dres, dg, dw, db
