"""One device's kernel call in the user's layout: inputs to kernel layout, outputs back, and the
gate gradient.

User layout (as :func:`jaxblocks.attention.linear_ops.chunk_gla`): ``q[B, T, H, K]``,
``k[B, T, Hk, K]``, ``v[B, T, Hk, V]``, log-gates ``[B, T, Hk, K]`` / ``[B, T, Hk]`` / None,
state ``[B, Hk, K, V]``, document index ``[B, T]`` (see
:func:`jaxblocks.attention.linear_ops.document_index`).

Done in XLA around the kernels (all cheap, elementwise or transposes):

* time padded to whole chunks (zero keys and unit gates change nothing), heads moved before time;
  on GPU K and V padded to powers of two (Triton tiles);
* the in-chunk cumulative log-gates ``b`` in float32 (Mosaic has no cumsum; computing them once
  here also spares both backward passes);
* the document index made relative to the state entering each chunk;
* the gate gradient: with ``B`` the cumulative log-gate, ``dB_t = Σ_heads q_t ⊙ dq_t − k_t ⊙ dk_t``
  (plus ``Σ_v S_T ⊙ dS_T`` at the last token), and ``d log_g`` its reverse cumulative sum within
  each document (zero at a document's first token, whose gate multiplies a reset state).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks.kernels.gla import gpu as gpu_kernels
from jaxblocks.kernels.gla import tpu as tpu_kernels
from jaxblocks.kernels.gla.chunk import ChunkSpec

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static choices of one call: ``backend`` ``tpu``/``gpu``, chunking, query scale (None:
  ``K ** -0.5``), value tile (None: the backend's default) and Pallas ``interpret`` mode."""

  backend: str
  chunk_size: int
  sub_chunk: int
  scale: float | None
  block_v: int | None
  interpret: Any


def _pow2(n: int) -> int:
  return max(16, 1 << (n - 1).bit_length())


def matmul_dtype(*arrays) -> str:
  """bfloat16 operands when every input is bfloat16, float32 otherwise."""
  dtypes = {np.dtype(a.dtype) for a in arrays}
  return "bfloat16" if dtypes == {np.dtype(jnp.bfloat16)} else "float32"


def default_block_v(backend: str, v_dim: int) -> int:
  if backend == "gpu":
    return min(v_dim, 128)
  if v_dim > 512 and v_dim % 256 == 0:
    return 256
  return v_dim


@dataclasses.dataclass(frozen=True)
class _Plan:
  spec: ChunkSpec
  time: int
  padded_time: int
  n_chunks: int
  key_dim: int
  value_dim: int
  padded_value_dim: int
  group: int


def plan(cfg: KernelConfig, q, v, log_g, has_segments: bool) -> _Plan:
  _, t, h, kd = q.shape
  hk, vd = v.shape[2], v.shape[3]
  if cfg.backend == "gpu":  # Triton tiles: a power-of-two chunk
    c_len = min(cfg.chunk_size, 1 << (max(t, cfg.sub_chunk) - 1).bit_length())
  else:
    c_len = min(cfg.chunk_size, -(-t // cfg.sub_chunk) * cfg.sub_chunk)
  n = -(-t // c_len)
  kp, vp = (_pow2(kd), _pow2(vd)) if cfg.backend == "gpu" else (kd, vd)
  block_v = cfg.block_v or default_block_v(cfg.backend, vp)
  gate = "none" if log_g is None else ("head" if log_g.ndim == 3 else "key")
  spec = ChunkSpec(chunk=c_len, sub_chunk=cfg.sub_chunk, gate=gate, segments=has_segments,
                   scale=float(kd ** -0.5 if cfg.scale is None else cfg.scale), key_dim=kp,
                   block_v=block_v, matmul_dtype=matmul_dtype(q, v))
  return _Plan(spec, t, n * c_len, n, kd, vd, vp, h // hk)


def _heads_first(x, p: _Plan, last: int):
  """``[B, T, H, D]`` → ``[B, H, Tp, Dp]`` (zero padded)."""
  x = jnp.pad(x, [(0, 0), (0, p.padded_time - p.time), (0, 0), (0, last - x.shape[3])])
  return jnp.transpose(x, (0, 2, 1, 3))


def _heads_last(x, p: _Plan, last: int):
  """``[B, H, Tp, Dp]`` → ``[B, T, H, D]``."""
  return jnp.transpose(x[:, :, :p.time, :last], (0, 2, 1, 3))


def _pad_state(s, p: _Plan):
  return jnp.pad(s.astype(F32), [(0, 0), (0, 0), (0, p.spec.key_dim - p.key_dim),
                                 (0, p.padded_value_dim - p.value_dim)])


def _group_sum(x, p: _Plan):
  """Per-query-head ``[B, H, ...]`` → per key/value head ``[B, Hk, ...]``."""
  return x.reshape(x.shape[0], -1, p.group, *x.shape[2:]).sum(axis=2)


def _kernel_inputs(p: _Plan, q, k, v, log_g, doc):
  spec = p.spec
  kp = spec.key_dim
  qk = _heads_first(q, p, kp)
  kk = _heads_first(k, p, kp)
  vk = _heads_first(v, p, p.padded_value_dim)
  b = None
  if log_g is not None:
    lg = log_g.astype(F32)
    lg = lg[..., None] if lg.ndim == 3 else jnp.pad(lg, [(0, 0)] * 3 + [(0, kp - p.key_dim)])
    lg = jnp.pad(lg, [(0, 0), (0, p.padded_time - p.time), (0, 0), (0, 0)])
    bsz, _, hk, width = lg.shape
    b = jnp.cumsum(lg.reshape(bsz, p.n_chunks, spec.chunk, hk, width), axis=2)
    b = jnp.transpose(b.reshape(bsz, p.padded_time, hk, width), (0, 2, 1, 3))
  doc_col = doc_row = None
  if spec.segments:
    bsz = doc.shape[0]
    d = jnp.pad(doc, [(0, 0), (0, p.padded_time - p.time)], mode="edge")
    d = d.reshape(bsz, p.n_chunks, spec.chunk)
    before = jnp.concatenate([jnp.zeros((bsz, 1), d.dtype), d[:, :-1, -1]], axis=1)
    rel = (d - before[:, :, None]).astype(F32)
    doc_col = rel.reshape(bsz, p.padded_time, 1)
    doc_row = rel.reshape(bsz, p.n_chunks, 1, spec.chunk)
  return qk, kk, vk, b, doc_col, doc_row


def _kernels(cfg: KernelConfig):
  return gpu_kernels if cfg.backend == "gpu" else tpu_kernels


def forward(cfg: KernelConfig, q, k, v, log_g, state, doc):
  """``(o[B, T, H, V] in q.dtype, final_state[B, Hk, K, V] float32)``; ``doc`` None without
  packed sequences."""
  p = plan(cfg, q, v, log_g, doc is not None)
  qk, kk, vk, b, doc_col, doc_row = _kernel_inputs(p, q, k, v, log_g, doc)
  o, final = _kernels(cfg).forward(qk, kk, vk, b, doc_col, doc_row, _pad_state(state, p), p.spec,
                                   interpret=cfg.interpret)
  final = final[:, ::p.group, :p.key_dim, :p.value_dim]
  return _heads_last(o, p, p.value_dim), final


def _segmented_reverse_cumsum(x, doc):
  """``Σ_{s ≥ t, doc_s = doc_t} x_s`` along axis 1 (``doc`` ``[B, T]`` or None)."""
  if doc is None:
    return jnp.flip(jnp.cumsum(jnp.flip(x, 1), axis=1), 1)
  last = jnp.concatenate([doc[:, 1:] != doc[:, :-1], jnp.ones_like(doc[:, :1], bool)], axis=1)
  starts = jnp.flip(last, 1).astype(x.dtype).reshape(last.shape + (1,) * (x.ndim - 2))
  starts = jnp.broadcast_to(starts, x.shape)

  def combine(a, b):
    xa, sa = a
    xb, sb = b
    return xb + (1.0 - sb) * xa, jnp.maximum(sa, sb)

  out, _ = jax.lax.associative_scan(combine, (jnp.flip(x, 1), starts), axis=1)
  return jnp.flip(out, 1)


def backward(cfg: KernelConfig, q, k, v, log_g, state, doc, final, do, dfinal):
  """Gradients ``(dq, dk, dv, dlog_g or None, dstate)`` of :func:`forward` given the output
  cotangents ``do`` and ``dfinal`` (``final`` is the forward's final state)."""
  p = plan(cfg, q, v, log_g, doc is not None)
  qk, kk, vk, b, doc_col, doc_row = _kernel_inputs(p, q, k, v, log_g, doc)
  dok = _heads_first(do.astype(q.dtype), p, p.padded_value_dim)
  # The final-state cotangent enters the reverse pass of one query head per group.
  dfinal_q = jnp.repeat(_pad_state(dfinal, p), p.group, axis=1)
  dfinal_q = jnp.where((jnp.arange(dfinal_q.shape[1]) % p.group == 0)[:, None, None], dfinal_q, 0.)
  dq, dk, dv, dstate = _kernels(cfg).backward(
      qk, kk, vk, b, doc_col, doc_row, _pad_state(state, p), dok, dfinal_q, p.spec,
      interpret=cfg.interpret)
  dq = _heads_last(dq.sum(axis=0), p, p.key_dim)  # [B, T, H, K] float32
  dk = _heads_last(_group_sum(dk.sum(axis=0), p), p, p.key_dim)
  dv = _heads_last(_group_sum(dv, p), p, p.value_dim)
  dstate = _group_sum(dstate, p)[:, :, :p.key_dim, :p.value_dim]
  dlog_g = None
  if log_g is not None:
    bsz, t, h, kd = q.shape
    hk = k.shape[2]
    q_dq = (q.astype(F32) * dq).reshape(bsz, t, hk, p.group, kd).sum(axis=3)
    d_cum = q_dq - k.astype(F32) * dk
    d_cum = d_cum.at[:, -1].add(jnp.sum(final * dfinal.astype(F32), axis=-1))
    dlog_g = _segmented_reverse_cumsum(d_cum, doc)
    if doc is not None:
      reset = jnp.concatenate([jnp.zeros_like(doc[:, :1], bool), doc[:, 1:] != doc[:, :-1]], 1)
      dlog_g = jnp.where(reset[:, :, None, None], 0.0, dlog_g)
    if log_g.ndim == 3:
      dlog_g = dlog_g.sum(axis=-1)
    dlog_g = dlog_g.astype(log_g.dtype)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dlog_g,
          dstate)
