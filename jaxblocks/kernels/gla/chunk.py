"""What the GLA kernels compute on one chunk, shared by the TPU (Mosaic) and GPU (Triton) kernels.

A kernel program owns one (batch, query head, value tile) and walks the chunks of the sequence
(TPU: the last grid axis, sequential; GPU: a loop inside the program), carrying a float32 state
tile ``S[K, Vb]`` from chunk to chunk. The functions here do the work of one chunk; they read and
write through a backend-specific ``io`` object:

* ``io.load(name, start, size)`` → float32 ``[size, width]`` rows ``start … start+size`` of the
  chunk for ``name`` in ``q, k, v, do`` (``width`` = K or Vb);
* ``io.gate(start, size)`` → float32 ``[size, 1 or K]`` in-chunk cumulative log-gates (None
  without gates);
* ``io.doc_col(start, size)`` → ``[size, 1]`` and ``io.doc_row()`` → ``[1, C]`` float32 document
  index relative to the state entering the chunk (0 = the document the state belongs to; only
  with packed sequences);
* ``io.store(name, start, value)`` writes rows of an output (``o``, ``dq``, ``dk``, ``dv``).

Nothing here slices a value (Triton cannot): sub-chunks are loaded from refs, single rows and
columns are taken with masked reductions, and results are stored per sub-chunk.

Math, with ``b`` the in-chunk cumulative log-gate (float32, ≤ 0 and non-increasing), ``q``
pre-multiplied by ``scale``, ``M`` the causal (and same-document) mask and ``A_ij = Σ_d q_id k_jd
exp(b_id − b_jd)``::

    o   = (q ⊙ e^b) S + (A ⊙ M) v
    S'  = e^{b_L} ⊙ S + (k ⊙ e^{b_L − b})ᵀ v                    (b_L: the chunk's last row)
    dq  = (dO Sᵀ) ⊙ e^b + intra(dA)         dA = (dO vᵀ) ⊙ M
    dk  = (v dS'ᵀ) ⊙ e^{b_L − b} + intra(dAᵀ)
    dv  = (k ⊙ e^{b_L − b}) dS' + (A ⊙ M)ᵀ dO
    dS  = e^{b_L} ⊙ dS' + (q ⊙ e^b)ᵀ dO

Secondary chunking keeps every exponent ≤ 0: scores between query sub-chunk ``s`` and earlier
keys are one matmul of ``q ⊙ e^{b − b_ref}`` and ``k ⊙ e^{b_ref − b}`` with ``b_ref`` the gate just
before ``s`` (key-oriented passes use the gate at the end of key sub-chunk ``r`` and later
queries); the diagonal sub-blocks are built column by column from ``exp(b_i − b_j)`` (i ≥ j).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

GATES = ("key", "head", "none")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ChunkSpec:
  """Static description of one kernel call (hashable).

  chunk / sub_chunk: rows per chunk and per secondary chunk. gate: ``key`` (log-gate per key
  dim), ``head`` (scalar per head) or ``none``. segments: packed sequences (document masks).
  scale: query scale. key_dim / block_v: K and the value tile width. matmul_dtype: operand dtype
  of the matmuls (the input dtype; accumulation is always float32).
  """

  chunk: int
  sub_chunk: int
  gate: str
  segments: bool
  scale: float
  key_dim: int
  block_v: int
  matmul_dtype: str

  @property
  def n_sub(self) -> int:
    return self.chunk // self.sub_chunk


# ----------------------------------------------------------------------------- small helpers


def _dot(a, b, spec: ChunkSpec, contract):
  dtype = np.dtype(spec.matmul_dtype)
  precision = jax.lax.Precision.HIGHEST if dtype == np.float32 else None
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                             preferred_element_type=F32, precision=precision)


def mm(a, b, spec):
  """``a @ b``."""
  return _dot(a, b, spec, ((1,), (0,)))


def mm_nt(a, b, spec):
  """``a @ bᵀ``."""
  return _dot(a, b, spec, ((1,), (1,)))


def mm_tn(a, b, spec):
  """``aᵀ @ b``."""
  return _dot(a.T, b, spec, ((1,), (0,)))


def _iota(shape, axis):
  return jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def row(x, i):
  """Row ``i`` of ``x`` as ``[1, n]`` (masked reduction; no slicing)."""
  return jnp.sum(jnp.where(_iota(x.shape, 0) == i, x, 0.0), axis=0, keepdims=True)


def col(x, j):
  """Column ``j`` of ``x`` as ``[m, 1]``."""
  return jnp.sum(jnp.where(_iota(x.shape, 1) == j, x, 0.0), axis=1, keepdims=True)


def _exp_masked(diff, mask):
  """``exp(diff)`` where ``mask``, exactly 0 elsewhere (masked before the exponential)."""
  return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def _gate(io, start, size, spec):
  """In-chunk cumulative log-gates ``[size, K]`` (head gates broadcast), or None."""
  if spec.gate == "none":
    return None
  b = io.gate(start, size)
  return jnp.broadcast_to(b, (size, spec.key_dim)) if spec.gate == "head" else b


class _ChunkMasks:
  """Document structure of a chunk: who reads the incoming state, who writes the outgoing one."""

  def __init__(self, io, spec: ChunkSpec):
    self.spec = spec
    self.io = io
    if spec.segments:
      self.doc_all = io.doc_col(0, spec.chunk)  # [C, 1]
      self.doc_row = io.doc_row()  # [1, C]
      self.doc_last = jnp.max(self.doc_all)
      self.keep = self.doc_last == 0.0  # the state survives the chunk

  def reads(self, start, size):
    """``[size, 1]`` rows that read the incoming state (None: all)."""
    if not self.spec.segments:
      return None
    return self.io.doc_col(start, size) == 0.0

  def writes(self, start, size):
    """``[size, 1]`` rows that contribute to the outgoing state (None: all)."""
    if not self.spec.segments:
      return None
    return self.io.doc_col(start, size) == self.doc_last

  def query_mask(self, start, size):
    """``[size, C]`` causal/same-document mask for query rows ``start …`` against all keys."""
    shape = (size, self.spec.chunk)
    mask = _iota(shape, 1) <= start + _iota(shape, 0)
    if self.spec.segments:
      mask = mask & (self.io.doc_col(start, size) == self.doc_row)
    return mask

  def key_mask(self, start, size):
    """``[size, C]`` mask for key rows ``start …`` (transposed scores) against all queries."""
    shape = (size, self.spec.chunk)
    mask = _iota(shape, 1) >= start + _iota(shape, 0)
    if self.spec.segments:
      mask = mask & (self.io.doc_col(start, size) == self.doc_row)
    return mask


def _where(mask, x):
  return x if mask is None else jnp.where(mask, x, 0.0)


def _last_gate(b_all, spec):
  """The chunk's total log-gate as a row ``[1, K]`` and a column ``[K, 1]``."""
  b_last_row = row(b_all, spec.chunk - 1)
  b_last_col = col(b_all.T, spec.chunk - 1)
  return b_last_row, b_last_col


# ----------------------------------------------------------------------------- state passes


def next_state(io, state, masks: _ChunkMasks, spec: ChunkSpec, k_all, v_all, b_all):
  """``S' = keep · e^{b_L} ⊙ S + (k ⊙ e^{b_L − b} ⊙ last)ᵀ v``."""
  if b_all is None:
    decayed, k_w = state, k_all
  else:
    b_last_row, b_last_col = _last_gate(b_all, spec)
    decayed = jnp.exp(b_last_col) * state
    k_w = k_all * jnp.exp(b_last_row - b_all)
  k_w = _where(masks.writes(0, spec.chunk), k_w)
  if spec.segments:
    decayed = jnp.where(masks.keep, decayed, 0.0)
  return decayed + mm_tn(k_w, v_all, spec)


def previous_dstate(dstate, masks: _ChunkMasks, spec: ChunkSpec, q_all, do_all, b_all):
  """``dS = keep · e^{b_L} ⊙ dS' + (q ⊙ e^b ⊙ reads)ᵀ dO``."""
  if b_all is None:
    decayed, q_w = dstate, q_all
  else:
    _, b_last_col = _last_gate(b_all, spec)
    decayed = jnp.exp(b_last_col) * dstate
    q_w = q_all * jnp.exp(b_all)
  q_w = _where(masks.reads(0, spec.chunk), q_w)
  if spec.segments:
    decayed = jnp.where(masks.keep, decayed, 0.0)
  return decayed + mm_tn(q_w, do_all, spec)


# ----------------------------------------------------------------------------- intra-chunk


def _query_scores(q_s, k_s, b_s, k_all, b_all, start, masks, spec):
  """Scores ``[cs, C]`` of query sub-chunk ``start`` against every key of the chunk (masked)."""
  cs, c_len = spec.sub_chunk, spec.chunk
  shape = (cs, c_len)
  if b_all is None:
    scores = mm_nt(q_s, k_all, spec)
  else:
    rows_s = _iota((cs, 1), 0)

    def key_column(jj, scores):  # diagonal sub-block, exactly, one key column at a time
      decay = _exp_masked(b_s - row(b_s, jj), rows_s >= jj)
      column = jnp.sum(q_s * row(k_s, jj) * decay, axis=1, keepdims=True)
      return scores + jnp.where(_iota(shape, 1) == start + jj, column, 0.0)

    scores = jax.lax.fori_loop(0, cs, key_column, jnp.zeros(shape, F32))
    if start > 0:  # earlier sub-chunks: one matmul around b_ref = b[start - 1]
      b_ref = row(b_all, start - 1)
      k_ref = k_all * _exp_masked(b_ref - b_all, _iota((c_len, 1), 0) < start)
      scores = scores + mm_nt(q_s * jnp.exp(b_s - b_ref), k_ref, spec)
  return jnp.where(masks.query_mask(start, cs), scores, 0.0)


def _key_scores(k_r, q_r, b_r, q_all, b_all, start, masks, spec):
  """Transposed scores ``[cs, C]`` (``A_ij`` at ``[j, i]``) of key sub-chunk ``start`` against
  every query of the chunk, and the query operand ``q ⊙ e^{b − b_end}`` of later sub-chunks."""
  cs, c_len = spec.sub_chunk, spec.chunk
  shape = (cs, c_len)
  q_later = None
  if b_all is None:
    scores = mm_nt(k_r, q_all, spec)
  else:
    rows_r = _iota((cs, 1), 0)

    def query_column(ii, scores):  # diagonal sub-block, one query column at a time
      decay = _exp_masked(row(b_r, ii) - b_r, rows_r <= ii)
      column = jnp.sum(k_r * row(q_r, ii) * decay, axis=1, keepdims=True)
      return scores + jnp.where(_iota(shape, 1) == start + ii, column, 0.0)

    scores = jax.lax.fori_loop(0, cs, query_column, jnp.zeros(shape, F32))
    end = start + cs - 1
    if end < c_len - 1:  # later sub-chunks: one matmul around b_end = b[end]
      b_end = row(b_all, end)
      q_later = q_all * _exp_masked(b_all - b_end, _iota((c_len, 1), 0) > end)
      scores = scores + mm_nt(k_r * jnp.exp(b_end - b_r), q_later, spec)
  return jnp.where(masks.key_mask(start, cs), scores, 0.0), q_later


# ----------------------------------------------------------------------------- chunk passes


def forward(io, state, spec: ChunkSpec):
  """Outputs of one chunk (stored through ``io``) and the state after it."""
  cs = spec.sub_chunk
  masks = _ChunkMasks(io, spec)
  k_all, v_all = io.load("k", 0, spec.chunk), io.load("v", 0, spec.chunk)
  b_all = _gate(io, 0, spec.chunk, spec)
  for s in range(spec.n_sub):
    start = s * cs
    q_s = io.load("q", start, cs) * spec.scale
    b_s = _gate(io, start, cs, spec)
    q_read = q_s if b_s is None else q_s * jnp.exp(b_s)
    o_s = mm(_where(masks.reads(start, cs), q_read), state, spec)
    k_s = io.load("k", start, cs) if b_all is not None else None
    scores = _query_scores(q_s, k_s, b_s, k_all, b_all, start, masks, spec)
    io.store("o", start, o_s + mm(scores, v_all, spec))
  return next_state(io, state, masks, spec, k_all, v_all, b_all)


def backward_dq(io, state, spec: ChunkSpec):
  """``dq`` of one chunk (partial over value tiles; stored through ``io``) given the state
  entering it; returns the state after it (recomputed, forward order)."""
  cs, c_len = spec.sub_chunk, spec.chunk
  masks = _ChunkMasks(io, spec)
  k_all, v_all = io.load("k", 0, c_len), io.load("v", 0, c_len)
  b_all = _gate(io, 0, c_len, spec)
  for s in range(spec.n_sub):
    start = s * cs
    do_s = io.load("do", start, cs)
    b_s = _gate(io, start, cs, spec)
    d_scores = jnp.where(masks.query_mask(start, cs), mm_nt(do_s, v_all, spec), 0.0)
    dq_read = mm_nt(do_s, state, spec)  # dO Sᵀ
    if b_s is None:
      dq_s = _where(masks.reads(start, cs), dq_read) + mm(d_scores, k_all, spec)
    else:
      dq_s = _where(masks.reads(start, cs), dq_read * jnp.exp(b_s))
      k_s = io.load("k", start, cs)
      rows_s = _iota((cs, 1), 0)

      def key_column(jj, dq_s):
        decay = _exp_masked(b_s - row(b_s, jj), rows_s >= jj)
        return dq_s + col(d_scores, start + jj) * row(k_s, jj) * decay

      dq_s = jax.lax.fori_loop(0, cs, key_column, dq_s)
      if start > 0:
        b_ref = row(b_all, start - 1)
        k_ref = k_all * _exp_masked(b_ref - b_all, _iota((c_len, 1), 0) < start)
        dq_s = dq_s + mm(d_scores, k_ref, spec) * jnp.exp(b_s - b_ref)
    io.store("dq", start, dq_s * spec.scale)
  return next_state(io, state, masks, spec, k_all, v_all, b_all)


def backward_dkdv(io, dstate, spec: ChunkSpec):
  """``dk`` (partial over value tiles) and ``dv`` of one chunk given the cotangent of the state
  after it; returns the cotangent of the state entering it (reverse order)."""
  cs, c_len = spec.sub_chunk, spec.chunk
  masks = _ChunkMasks(io, spec)
  q_all = io.load("q", 0, c_len) * spec.scale
  do_all = io.load("do", 0, c_len)
  b_all = _gate(io, 0, c_len, spec)
  if b_all is not None:
    b_last_row, _ = _last_gate(b_all, spec)
  for r in range(spec.n_sub):
    start = r * cs
    k_r, v_r = io.load("k", start, cs), io.load("v", start, cs)
    b_r = _gate(io, start, cs, spec)
    q_r = io.load("q", start, cs) * spec.scale if b_r is not None else None
    scores_t, q_later = _key_scores(k_r, q_r, b_r, q_all, b_all, start, masks, spec)
    d_scores_t = jnp.where(masks.key_mask(start, cs), mm_nt(v_r, do_all, spec), 0.0)
    writes = masks.writes(start, cs)
    if b_r is None:
      dk_r = mm(d_scores_t, q_all, spec) + _where(writes, mm_nt(v_r, dstate, spec))
      k_w = _where(writes, k_r)
    else:
      rows_r = _iota((cs, 1), 0)

      def query_column(ii, dk_r):
        decay = _exp_masked(row(b_r, ii) - b_r, rows_r <= ii)
        return dk_r + col(d_scores_t, start + ii) * row(q_r, ii) * decay

      dk_r = jax.lax.fori_loop(0, cs, query_column, jnp.zeros((cs, spec.key_dim), F32))
      if q_later is not None:
        b_end = row(b_all, start + cs - 1)
        dk_r = dk_r + mm(d_scores_t, q_later, spec) * jnp.exp(b_end - b_r)
      to_end = jnp.exp(b_last_row - b_r)
      dk_r = dk_r + _where(writes, mm_nt(v_r, dstate, spec) * to_end)
      k_w = _where(writes, k_r * to_end)
    io.store("dk", start, dk_r)
    io.store("dv", start, mm(scores_t, do_all, spec) + mm(k_w, dstate, spec))
  return previous_dstate(dstate, masks, spec, q_all, do_all, b_all)
