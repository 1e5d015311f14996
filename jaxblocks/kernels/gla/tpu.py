"""Pallas Mosaic (TPU) kernels for chunked gated linear attention: forward, dq, dk/dv.

Kernel layout (prepared by :mod:`jaxblocks.kernels.gla.layout`): ``q[B, H, T, K]``,
``k[B, Hk, T, K]``, ``v[B, Hk, T, V]``, in-chunk cumulative log-gates ``b[B, Hk, T, 1 or K]``
float32, document index ``doc_col[B, T, 1]`` / ``doc_row[B, N, 1, C]`` float32, states
``[B, Hk, K, V]`` float32; ``T`` a multiple of the chunk ``C``.

Grid ``(B, H, V / Vb, N)``: the first three axes are ``parallel`` (megacore-shardable), the chunk
axis is ``arbitrary`` and walks the sequence (forwards for the output and dq passes, backwards
for the dk/dv pass) with the float32 state tile ``[K, Vb]`` in a VMEM scratch. Query head ``h``
reads key/value head ``h // G`` (GQA). Blocks are whole chunks: ``C`` a multiple of 8 (16 for
bfloat16 inputs) and ``Vb`` the full V or a multiple of 128 satisfy the (8, 128) tiling rule.

dq and dk are written per value tile (``[V / Vb, ...]`` float32 partial sums, reduced outside);
states, their cotangents and per-query-head dk/dv/dS are summed over the GQA group outside.
The backward recomputes the chunk states in its forward-order dq pass instead of storing them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.gla import chunk as CK
from jaxblocks.kernels.gla.chunk import ChunkSpec

VMEM_LIMIT_BYTES = 64 * 2**20


class _BlockIO:
  """``io`` for :mod:`chunk` over chunk-sized VMEM blocks."""

  def __init__(self, refs: dict, spec: ChunkSpec):
    self.refs = refs

  def load(self, name, start, size):
    return self.refs[name][pl.ds(start, size), :].astype(jnp.float32)

  def gate(self, start, size):
    return self.refs["b"][pl.ds(start, size), :]

  def doc_col(self, start, size):
    return self.refs["doc_col"][pl.ds(start, size), :]

  def doc_row(self):
    return self.refs["doc_row"][...]

  def store(self, name, start, value):
    ref = self.refs[name]
    ref[pl.ds(start, value.shape[0]), :] = value.astype(ref.dtype)


def _compiler_params():
  return pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
      vmem_limit_bytes=VMEM_LIMIT_BYTES)


def _kv(h, group: int):
  """Key/value head of query head ``h`` (truncating division: Mosaic has no floor-div sign)."""
  return jax.lax.div(h, jnp.int32(group)) if group > 1 else h


def _specs(spec: ChunkSpec, group: int, n_chunks: int, reverse: bool):
  """Block specs of every operand by name."""
  c_len, kd, vb = spec.chunk, spec.key_dim, spec.block_v
  t = (lambda n: n_chunks - 1 - n) if reverse else (lambda n: n)
  return {
      "q": pl.BlockSpec((None, None, c_len, kd), lambda b, h, j, n: (b, h, t(n), 0)),
      "do": pl.BlockSpec((None, None, c_len, vb), lambda b, h, j, n: (b, h, t(n), j)),
      "k": pl.BlockSpec((None, None, c_len, kd), lambda b, h, j, n: (b, _kv(h, group), t(n), 0)),
      "v": pl.BlockSpec((None, None, c_len, vb), lambda b, h, j, n: (b, _kv(h, group), t(n), j)),
      "b": pl.BlockSpec((None, None, c_len, kd if spec.gate == "key" else 1),
                        lambda b, h, j, n: (b, _kv(h, group), t(n), 0)),
      "doc_col": pl.BlockSpec((None, c_len, 1), lambda b, h, j, n: (b, t(n), 0)),
      "doc_row": pl.BlockSpec((None, None, 1, c_len), lambda b, h, j, n: (b, t(n), 0, 0)),
      "state_in": pl.BlockSpec((None, None, kd, vb), lambda b, h, j, n: (b, _kv(h, group), 0, j)),
      "dstate_in": pl.BlockSpec((None, None, kd, vb), lambda b, h, j, n: (b, h, 0, j)),
      "state_out": pl.BlockSpec((None, None, kd, vb), lambda b, h, j, n: (b, h, 0, j)),
      "o": pl.BlockSpec((None, None, c_len, vb), lambda b, h, j, n: (b, h, t(n), j)),
      "dv": pl.BlockSpec((None, None, c_len, vb), lambda b, h, j, n: (b, h, t(n), j)),
      "dq": pl.BlockSpec((None, None, None, c_len, kd), lambda b, h, j, n: (j, b, h, t(n), 0)),
      "dk": pl.BlockSpec((None, None, None, c_len, kd), lambda b, h, j, n: (j, b, h, t(n), 0)),
  }


def _optional_inputs(spec: ChunkSpec, b, doc_col, doc_row):
  names, arrays = [], []
  if spec.gate != "none":
    names.append("b")
    arrays.append(b)
  if spec.segments:
    names += ["doc_col", "doc_row"]
    arrays += [doc_col, doc_row]
  return names, arrays


def _kernel(*refs, in_names, out_names, spec, n_chunks, step):
  """Generic chunk-walking kernel: ``step(io, carry) -> carry`` with the carry in scratch."""
  n_in, n_out = len(in_names), len(out_names)
  named = dict(zip(in_names + out_names, refs[:n_in + n_out]))
  carry_ref = refs[n_in + n_out]
  n = pl.program_id(3)

  @pl.when(n == 0)
  def _():
    carry_ref[...] = named["state_in" if "state_in" in named else "dstate_in"][...]

  carry = step(_BlockIO(named, spec), carry_ref[...], spec)
  carry_ref[...] = carry
  if "state_out" in named:
    @pl.when(n == n_chunks - 1)
    def _():
      named["state_out"][...] = carry


def _call(step, name, spec: ChunkSpec, grid, inputs: dict, outputs: dict, group: int,
          reverse: bool, interpret):
  n_chunks = grid[3]
  block_specs = _specs(spec, group, n_chunks, reverse)
  in_names, out_names = list(inputs), list(outputs)
  return pl.pallas_call(
      functools.partial(_kernel, in_names=in_names, out_names=out_names, spec=spec,
                        n_chunks=n_chunks, step=step),
      grid=grid,
      in_specs=[block_specs[k] for k in in_names],
      out_specs=[block_specs[k] for k in out_names],
      out_shape=[outputs[k] for k in out_names],
      scratch_shapes=[pltpu.VMEM((spec.key_dim, spec.block_v), jnp.float32)],
      compiler_params=_compiler_params(), interpret=interpret, name=name,
  )(*[inputs[k] for k in in_names])


def _grid(spec: ChunkSpec, q, v):
  bsz, h, t, _ = q.shape
  return (bsz, h, v.shape[-1] // spec.block_v, t // spec.chunk)


def forward(q, k, v, b, doc_col, doc_row, state_in, spec: ChunkSpec, *, interpret=False):
  """``(o[B, H, T, V] in q.dtype, final_state[B, H, K, V] float32 per query head)``."""
  bsz, h, t, kd = q.shape
  vd = v.shape[-1]
  names, arrays = _optional_inputs(spec, b, doc_col, doc_row)
  inputs = dict(q=q, k=k, v=v, **dict(zip(names, arrays)), state_in=state_in)
  outputs = {"o": jax.ShapeDtypeStruct((bsz, h, t, vd), q.dtype),
             "state_out": jax.ShapeDtypeStruct((bsz, h, kd, vd), jnp.float32)}
  o, final = _call(CK.forward, "gla_chunk_fwd", spec, _grid(spec, q, v), inputs, outputs,
                   h // k.shape[1], False, interpret)
  return o, final


def backward(q, k, v, b, doc_col, doc_row, state_in, do, dstate_out, spec: ChunkSpec, *,
             interpret=False):
  """``dstate_out[B, H, K, V]`` is the final-state cotangent per query head (the caller puts it
  on one head of each group so that the group sum counts it once). Returns
  ``(dq[nV, B, H, T, K], dk[nV, B, H, T, K], dv[B, H, T, V], dstate_in[B, H, K, V])``, all
  float32 and per query head (dq/dk per value tile)."""
  bsz, h, t, kd = q.shape
  vd = v.shape[-1]
  grid = _grid(spec, q, v)
  group = h // k.shape[1]
  names, arrays = _optional_inputs(spec, b, doc_col, doc_row)
  optional = dict(zip(names, arrays))
  dq = _call(CK.backward_dq, "gla_chunk_bwd_dq", spec, grid,
             dict(k=k, v=v, do=do, **optional, state_in=state_in),
             {"dq": jax.ShapeDtypeStruct((grid[2], bsz, h, t, kd), jnp.float32)},
             group, False, interpret)[0]
  dk, dv, dstate_in = _call(
      CK.backward_dkdv, "gla_chunk_bwd_dkdv", spec, grid,
      dict(q=q, k=k, v=v, do=do, **optional, dstate_in=dstate_out),
      {"dk": jax.ShapeDtypeStruct((grid[2], bsz, h, t, kd), jnp.float32),
       "dv": jax.ShapeDtypeStruct((bsz, h, t, vd), jnp.float32),
       "state_out": jax.ShapeDtypeStruct((bsz, h, kd, vd), jnp.float32)},
      group, True, interpret)
  return dq, dk, dv, dstate_in
