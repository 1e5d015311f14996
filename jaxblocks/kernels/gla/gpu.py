"""Pallas GPU kernels (Triton lowering) for chunked gated linear attention: forward, dq, dk/dv.

Same operands and results as :mod:`jaxblocks.kernels.gla.tpu` (kernel layout; K and V padded to
powers of two ≥ 16 by the caller, chunk and sub-chunk powers of two ≥ 16, as Triton tiles and
``tl.dot`` need). The Triton lowering is selected explicitly with
``jax.experimental.pallas.triton.CompilerParams`` (jax 0.10/0.11 send a bare ``pallas_call`` to
Mosaic GPU).

Triton programs cannot carry state across grid steps, so the grid is ``(B, H, V / Vb)`` and each
program walks its chunks in a ``fori_loop`` (forwards, or backwards for dk/dv), the float32 state
tile ``[K, Vb]`` in registers. Operands stay in global memory (``pl.ANY``); every chunk and
sub-chunk is loaded with pointer offsets.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxblocks.kernels.gla import chunk as CK
from jaxblocks.kernels.gla.chunk import ChunkSpec

NUM_WARPS = 4
NUM_STAGES = 1


class _GlobalIO:
  """``io`` for :mod:`chunk` over whole arrays in global memory, at chunk ``n``."""

  def __init__(self, refs: dict, spec: ChunkSpec, n, ids, group: int):
    self.refs, self.spec = refs, spec
    self.b, self.h, self.j = ids
    self.hk = self.h // group
    self.t0 = n * spec.chunk
    self.n = n

  def _rows(self, start, size):
    return pl.ds(self.t0 + start, size)

  def _vals(self):
    return pl.ds(self.j * self.spec.block_v, self.spec.block_v)

  def load(self, name, start, size):
    ref, rows = self.refs[name], self._rows(start, size)
    if name == "q":
      x = ref[self.b, self.h, rows, :]
    elif name == "k":
      x = ref[self.b, self.hk, rows, :]
    elif name == "v":
      x = ref[self.b, self.hk, rows, self._vals()]
    else:  # do
      x = ref[self.b, self.h, rows, self._vals()]
    return x.astype(jnp.float32)

  def gate(self, start, size):
    return self.refs["b"][self.b, self.hk, self._rows(start, size), :]

  def doc_col(self, start, size):
    return self.refs["doc_col"][self.b, self._rows(start, size), :]

  def doc_row(self):
    return self.refs["doc_row"][self.b, self.n, :, :]

  def store(self, name, start, value):
    ref, rows = self.refs[name], self._rows(start, value.shape[0])
    if name in ("o", "dv"):
      ref[self.b, self.h, rows, self._vals()] = value.astype(ref.dtype)
    else:  # dq, dk: per value tile
      ref[self.j, self.b, self.h, rows, :] = value.astype(ref.dtype)


def _kernel(*refs, in_names, out_names, spec, n_chunks, group, step, reverse):
  named = dict(zip(in_names + out_names, refs))
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  vals = pl.ds(j * spec.block_v, spec.block_v)
  if "state_in" in named:
    carry = named["state_in"][b, h // group, :, vals]
  else:  # the final-state cotangent, per query head
    carry = named["dstate_in"][b, h, :, vals]

  def body(i, carry):
    n = n_chunks - 1 - i if reverse else i
    return step(_GlobalIO(named, spec, n, (b, h, j), group), carry, spec)

  carry = jax.lax.fori_loop(0, n_chunks, body, carry)
  if "state_out" in named:
    named["state_out"][b, h, :, vals] = carry


def _call(step, name, spec: ChunkSpec, inputs: dict, outputs: dict, grid, group, reverse,
          interpret):
  in_names, out_names = list(inputs), list(outputs)
  n_chunks = inputs["k"].shape[2] // spec.chunk
  anywhere = pl.BlockSpec(memory_space=pl.ANY)
  return pl.pallas_call(
      functools.partial(_kernel, in_names=in_names, out_names=out_names, spec=spec,
                        n_chunks=n_chunks, group=group, step=step, reverse=reverse),
      grid=grid, in_specs=[anywhere] * len(in_names), out_specs=[anywhere] * len(out_names),
      out_shape=[outputs[k] for k in out_names],
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      interpret=interpret, name=name,
  )(*[inputs[k] for k in in_names])


def _optional(spec: ChunkSpec, b, doc_col, doc_row):
  out = {}
  if spec.gate != "none":
    out["b"] = b
  if spec.segments:
    out.update(doc_col=doc_col, doc_row=doc_row)
  return out


def forward(q, k, v, b, doc_col, doc_row, state_in, spec: ChunkSpec, *, interpret=False):
  """Same contract as :func:`jaxblocks.kernels.gla.tpu.forward`."""
  bsz, h, t, kd = q.shape
  vd = v.shape[-1]
  grid = (bsz, h, vd // spec.block_v)
  inputs = dict(q=q, k=k, v=v, **_optional(spec, b, doc_col, doc_row), state_in=state_in)
  outputs = {"o": jax.ShapeDtypeStruct((bsz, h, t, vd), q.dtype),
             "state_out": jax.ShapeDtypeStruct((bsz, h, kd, vd), jnp.float32)}
  o, final = _call(CK.forward, "gla_chunk_fwd", spec, inputs, outputs, grid, h // k.shape[1],
                   False, interpret)
  return o, final


def backward(q, k, v, b, doc_col, doc_row, state_in, do, dstate_out, spec: ChunkSpec, *,
             interpret=False):
  """Same contract as :func:`jaxblocks.kernels.gla.tpu.backward`."""
  bsz, h, t, kd = q.shape
  vd = v.shape[-1]
  n_v = vd // spec.block_v
  grid = (bsz, h, n_v)
  group = h // k.shape[1]
  optional = _optional(spec, b, doc_col, doc_row)
  dq = _call(CK.backward_dq, "gla_chunk_bwd_dq", spec,
             dict(k=k, v=v, do=do, **optional, state_in=state_in),
             {"dq": jax.ShapeDtypeStruct((n_v, bsz, h, t, kd), jnp.float32)},
             grid, group, False, interpret)[0]
  dk, dv, dstate_in = _call(
      CK.backward_dkdv, "gla_chunk_bwd_dkdv", spec,
      dict(q=q, k=k, v=v, do=do, **optional, dstate_in=dstate_out),
      {"dk": jax.ShapeDtypeStruct((n_v, bsz, h, t, kd), jnp.float32),
       "dv": jax.ShapeDtypeStruct((bsz, h, t, vd), jnp.float32),
       "state_out": jax.ShapeDtypeStruct((bsz, h, kd, vd), jnp.float32)},
      grid, group, True, interpret)
  return dq, dk, dv, dstate_in
