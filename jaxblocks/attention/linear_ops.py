"""Gated linear-attention operators: recurrent, parallel and chunkwise forms of one recurrence.

Every linear-attention kind in jaxblocks (GLA, RetNet retention, linear attention, SLA) is the
recurrence, per key/value head ``h`` and with state ``S ∈ R^{K×V}``::

    S_t = diag(exp(log_g_t)) · S_{t-1} + k_tᵀ v_t          (state update)
    o_t = (scale · q_t) · S_t                               (readout, for every query head of h)

with the log-gate ``log_g`` (≤ 0) in one of three layouts:

* ``[batch, time, kv_heads, key_dim]`` — a decay per key dimension (GLA);
* ``[batch, time, kv_heads]``          — a scalar decay per head (retention, Mamba2-style);
* ``None``                             — no decay (linear attention).

Layout is ``[batch, time, heads, dim]``: ``q[B, T, H, K]``, ``k[B, T, Hk, K]``,
``v[B, T, Hk, V]`` with ``H % Hk == 0`` (GQA-style shared keys: query heads ``h·G … h·G+G-1``
read the state of key/value head ``h``, so the state is ``[B, Hk, K, V]``). ``scale`` defaults to
``K ** -0.5``; pass ``1.0`` for none.

Three forms compute the same function (outputs and gradients):

* :func:`recurrent_gla` — ``lax.scan`` over time, one :func:`gla_step` per token. The ground truth.
* :func:`parallel_gla` — quadratic masked form ``o_i = Σ_{j≤i} (q_i ⊙ exp(b_i − b_j))·k_j v_j``
  with ``b`` the cumulative log-gate over the whole sequence; for short sequences and testing
  (its ``b`` grows with T, so it loses relative precision in the exponent on very long inputs).
* :func:`chunk_gla` — chunkwise form, linear in T. The sequence is cut into chunks of
  ``chunk_size``; inside a chunk ``b`` is cumulated in float32 from the chunk start (the reference
  point is the state entering the chunk), so every exponent below is ≤ 0 and nothing overflows at
  any length or decay strength:

  - inter-chunk readout ``o_i += (q_i ⊙ exp(b_i)) · S_chunk``;
  - state ``S ← exp(b_last) ⊙ S + Σ_j (k_j ⊙ exp(b_last − b_j))ᵀ v_j``;
  - intra-chunk scores ``A_ij = Σ_d q_id k_jd exp(b_id − b_jd)`` for ``j ≤ i``. With per-key-dim
    gates this uses secondary chunking (sub-chunks of ``sub_chunk``): off-diagonal sub-blocks are
    matmuls of ``q ⊙ exp(b − b_ref)`` and ``k ⊙ exp(b_ref − b)`` with ``b_ref`` the cumulative gate
    just before the query sub-chunk (both exponents ≤ 0); diagonal sub-blocks form the
    ``exp(b_i − b_j)`` tensor elementwise. Scalar gates use the ``[C, C]`` decay matrix directly.

All forms take an ``initial_state`` (``[B, Hk, K, V]``, default zeros) and return
``(o[B, T, H, V], final_state[B, Hk, K, V])``. Inputs may be bfloat16: everything is computed
and accumulated in float32, the state is float32, ``o`` has the dtype of ``q``.

Packed sequences: ``segment_ids[B, T]`` (or ``cu_seqlens`` for a single packed row) mark
documents; the state is reset at every position whose segment id differs from the previous
token's, so nothing leaks across documents. ``initial_state`` belongs to the first document of
each row and ``final_state`` is the state after the last token (of the last document). Any change
of id is a boundary, so ids need not be increasing.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp

# ----------------------------------------------------------------------------- input checks


def _check(name, q, k, v, log_g, initial_state, segment_ids):
  for arr, what in ((q, "q"), (k, "k"), (v, "v")):
    if getattr(arr, "ndim", None) != 4:
      raise ValueError(f"{name}: {what} must have shape [batch, time, heads, dim], got "
                       f"{getattr(arr, 'shape', None)}")
  b, t, h, kd = q.shape
  if k.shape[:2] != (b, t) or k.shape[3] != kd:
    raise ValueError(f"{name}: k shape {k.shape} incompatible with q shape {q.shape} (need "
                     f"[{b}, {t}, kv_heads, {kd}])")
  hk = k.shape[2]
  if h % hk:
    raise ValueError(f"{name}: query heads {h} not divisible by key/value heads {hk}")
  if v.shape[:3] != (b, t, hk):
    raise ValueError(f"{name}: v shape {v.shape} incompatible with k shape {k.shape} (need "
                     f"[{b}, {t}, {hk}, value_dim])")
  for arr, what in ((q, "q"), (k, "k"), (v, "v")):
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"{name}: {what} must be floating point, got dtype {arr.dtype}")
  if log_g is not None:
    if log_g.shape not in ((b, t, hk), (b, t, hk, kd)):
      raise ValueError(f"{name}: log_g must have shape [{b}, {t}, {hk}] (scalar per head) or "
                       f"[{b}, {t}, {hk}, {kd}] (per key dim), got {log_g.shape}")
    if not jnp.issubdtype(log_g.dtype, jnp.floating):
      raise ValueError(f"{name}: log_g must be floating point, got dtype {log_g.dtype}")
  if initial_state is not None and initial_state.shape != (b, hk, kd, v.shape[3]):
    raise ValueError(f"{name}: initial_state must have shape {(b, hk, kd, v.shape[3])}, got "
                     f"{initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"{name}: segment_ids must have shape {(b, t)}, got {segment_ids.shape}")


def segment_ids_from_cu_seqlens(cu_seqlens, total_len: int):
  """Segment ids ``[1, total_len]`` from cumulative sequence lengths ``[n_docs + 1]``
  (``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == total_len``): token t belongs to document i when
  ``cu_seqlens[i] <= t < cu_seqlens[i + 1]``."""
  cu = jnp.asarray(cu_seqlens)
  if cu.ndim != 1 or not jnp.issubdtype(cu.dtype, jnp.integer):
    raise ValueError(f"cu_seqlens must be a 1-D integer array, got shape {cu.shape} dtype {cu.dtype}")
  t = jnp.arange(total_len, dtype=cu.dtype)
  return jnp.searchsorted(cu[1:], t, side="right").astype(jnp.int32)[None, :]


def _resolve_segments(name, q, segment_ids, cu_seqlens):
  if cu_seqlens is None:
    return segment_ids
  if segment_ids is not None:
    raise ValueError(f"{name}: pass segment_ids or cu_seqlens, not both")
  if q.shape[0] != 1:
    raise ValueError(f"{name}: cu_seqlens describes one packed row; batch must be 1, got "
                     f"{q.shape[0]}")
  return segment_ids_from_cu_seqlens(cu_seqlens, q.shape[1])


def document_index(segment_ids, batch: int, time: int):
  """``[B, T]`` int32 count of segment boundaries up to each token (0 for the first document).

  Two tokens are in the same document iff their counts are equal; the initial state belongs to
  document 0."""
  if segment_ids is None:
    return jnp.zeros((batch, time), jnp.int32)
  change = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(change, axis=1)], axis=1)


def _prepare(name, q, k, v, log_g, initial_state, segment_ids, cu_seqlens, scale):
  """Validate and bring inputs to float32: q grouped ``[B, T, Hk, G, K]`` and pre-scaled,
  log-gates ``[B, T, Hk, 1 or K]``, state ``[B, Hk, K, V]``, document index ``[B, T]``."""
  segment_ids = _resolve_segments(name, q, segment_ids, cu_seqlens)
  _check(name, q, k, v, log_g, initial_state, segment_ids)
  b, t, h, kd = q.shape
  hk, vd = k.shape[2], v.shape[3]
  scale = kd ** -0.5 if scale is None else scale
  f32 = jnp.float32
  qg = (q.astype(f32) * scale).reshape(b, t, hk, h // hk, kd)
  if log_g is None:
    lg = jnp.zeros((b, t, hk, 1), f32)
  elif log_g.ndim == 3:
    lg = log_g.astype(f32)[..., None]
  else:
    lg = log_g.astype(f32)
  s0 = jnp.zeros((b, hk, kd, vd), f32) if initial_state is None else initial_state.astype(f32)
  doc = document_index(segment_ids, b, t)
  return qg, k.astype(f32), v.astype(f32), lg, s0, doc


# ----------------------------------------------------------------------------- recurrent


def _step32(q_hgk, k_hk, v_hv, lg_hk, reset, state):
  """One float32 step on grouped inputs (batch axis first); ``reset[B]`` zeroes the state."""
  decayed = jnp.exp(lg_hk)[..., None] * state
  state = jnp.where(reset[:, None, None, None], 0.0, decayed)
  state = state + k_hk[..., :, None] * v_hv[..., None, :]
  o = jnp.einsum("bhgk,bhkv->bhgv", q_hgk, state)
  return o, state


def gla_step(q, k, v, log_g, state, *, scale=None):
  """One decoding step: ``q[B, H, K]``, ``k[B, Hk, K]``, ``v[B, Hk, V]``, ``log_g`` None /
  ``[B, Hk]`` / ``[B, Hk, K]``, ``state[B, Hk, K, V]`` → ``(o[B, H, V], new_state)``.

  The same arithmetic as one iteration of :func:`recurrent_gla` (float32 state)."""
  if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
    raise ValueError(f"gla_step: q, k, v must be [batch, heads, dim], got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  o, (new_state,) = _recurrent(
      "gla_step", q[:, None], k[:, None], v[:, None],
      None if log_g is None else log_g[:, None], state, None, None, scale)
  return o[:, 0], new_state


def _recurrent(name, q, k, v, log_g, initial_state, segment_ids, cu_seqlens, scale):
  qg, k32, v32, lg, s0, doc = _prepare(name, q, k, v, log_g, initial_state, segment_ids,
                                       cu_seqlens, scale)
  b, t, h = q.shape[:3]
  reset = jnp.concatenate([jnp.zeros((b, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)

  def body(state, xs):
    o, state = _step32(*xs, state)
    return state, o

  xs = tuple(jnp.moveaxis(a, 1, 0) for a in (qg, k32, v32, lg, reset))
  final, o_t = jax.lax.scan(body, s0, xs)
  o = jnp.moveaxis(o_t, 0, 1).reshape(b, t, h, v.shape[3]).astype(q.dtype)
  return o, (final,)


def recurrent_gla(q, k, v, log_g=None, *, initial_state=None, scale=None, segment_ids=None,
                  cu_seqlens=None):
  """Token-by-token recurrence (``lax.scan``): the reference the other forms are tested against.

  See the module docstring for shapes and semantics. Returns ``(o, final_state)``."""
  o, (final,) = _recurrent("recurrent_gla", q, k, v, log_g, initial_state, segment_ids,
                           cu_seqlens, scale)
  return o, final


# ----------------------------------------------------------------------------- parallel


def _masked_exp(diff, mask):
  """``exp(diff)`` where ``mask``, exactly 0 elsewhere (masked before the exponential, so large
  positive differences outside the mask never overflow and gradients stay finite)."""
  return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def parallel_gla(q, k, v, log_g=None, *, initial_state=None, scale=None, segment_ids=None,
                 cu_seqlens=None):
  """Quadratic masked form (memory ``O(T²·K)`` for per-key-dim gates): for short sequences.

  Returns ``(o, final_state)`` equal to :func:`recurrent_gla`."""
  qg, k32, v32, lg, s0, doc = _prepare("parallel_gla", q, k, v, log_g, initial_state,
                                       segment_ids, cu_seqlens, scale)
  b, t, h = q.shape[:3]
  cum = jnp.cumsum(lg, axis=1)  # [B, T, Hk, Kd], relative to the sequence start
  i_idx = jnp.arange(t)
  causal = i_idx[None, :] <= i_idx[:, None]  # [i, j]
  mask = causal[None] & (doc[:, :, None] == doc[:, None, :])  # [B, i, j]
  diff = cum[:, :, None] - cum[:, None, :]  # [B, i, j, Hk, Kd]
  decay = _masked_exp(diff, mask[..., None, None])
  if lg.shape[-1] == 1:
    scores = jnp.einsum("bihgk,bjhk->bhgij", qg, k32) * jnp.moveaxis(decay[..., 0], 3, 1)[:, :, None]
  else:
    scores = jnp.einsum("bihgk,bjhk,bijhk->bhgij", qg, k32, decay)
  o = jnp.einsum("bhgij,bjhv->bihgv", scores, v32)
  # Initial state: read by the first document, decayed from the sequence start.
  first = (doc == 0)[:, :, None, None, None]
  o = o + jnp.where(first, jnp.einsum("bihgk,bhkv->bihgv", qg * jnp.exp(cum)[:, :, :, None], s0), 0.)
  # Final state: tokens of the last document, decayed to the end; s0 only if no boundary.
  last_doc = doc[:, -1]
  in_last = (doc == last_doc[:, None])[:, :, None, None]
  w = _masked_exp(cum[:, -1:] - cum, in_last)
  carried = jnp.where((last_doc == 0)[:, None, None, None], jnp.exp(cum[:, -1])[..., None] * s0, 0.)
  final = carried + jnp.einsum("bjhk,bjhv->bhkv", k32 * w, v32)
  return o.reshape(b, t, h, v.shape[3]).astype(q.dtype), final


# ----------------------------------------------------------------------------- chunkwise


def _intra_scalar(q, k, cum, mask):
  """Intra-chunk scores with a scalar gate per head: ``(q_i·k_j) exp(b_i − b_j)``.

  q ``[B, N, C, Hk, G, K]``, k ``[B, N, C, Hk, K]``, cum ``[B, N, C, Hk, 1]``, mask
  ``[B, N, C, C]`` → ``[B, N, Hk, G, C, C]``."""
  diff = cum[:, :, :, None, :, 0] - cum[:, :, None, :, :, 0]  # [B, N, i, j, Hk]
  decay = _masked_exp(diff, mask[..., None])
  qk = jnp.einsum("bnihgk,bnjhk->bnhgij", q, k)
  return qk * jnp.moveaxis(decay, 4, 2)[:, :, :, None]


def _intra_vector(q, k, cum, mask, sub_chunk):
  """Intra-chunk scores with a gate per key dim, by secondary chunking.

  Sub-chunk ``s`` of the queries against sub-chunk ``r < s`` of the keys is one matmul of
  ``q ⊙ exp(b − b_ref[s])`` and ``k ⊙ exp(b_ref[s] − b)``, ``b_ref[s]`` being the cumulative gate
  at the last position before sub-chunk ``s`` (both exponents ≤ 0). Diagonal sub-blocks
  (``r == s``) use the exact ``[c, c, K]`` tensor ``exp(b_i − b_j)``.

  q ``[B, N, C, Hk, G, K]``, k and cum ``[B, N, C, Hk, K]``, mask ``[B, N, C, C]`` →
  ``[B, N, Hk, G, C, C]``. (Batch, chunk and head are folded into one axis so that no
  intermediate exceeds rank 6: jaxlib 0.10.2's CPU backend crashes on some rank-7 fusions.)
  """
  bsz, n, c_len, hk, g, kd = q.shape
  ns, cs = c_len // sub_chunk, sub_chunk
  m = bsz * n * hk
  qs = jnp.moveaxis(q, 3, 2).reshape(m, ns, cs, g, kd)
  ks = jnp.moveaxis(k, 3, 2).reshape(m, ns, cs, kd)
  bs = jnp.moveaxis(cum, 3, 2).reshape(m, ns, cs, kd)
  # Diagonal sub-blocks.
  tri = jnp.tril(jnp.ones((cs, cs), bool))
  diff = bs[:, :, :, None] - bs[:, :, None, :]  # [M, S, i, j, K]
  decay = _masked_exp(diff, tri[:, :, None])
  diag = jnp.einsum("msigk,msjk,msijk->mgsij", qs, ks, decay)
  # Off-diagonal sub-blocks.
  b_ref = jnp.concatenate([jnp.zeros_like(bs[:, :1, -1]), bs[:, :-1, -1]], axis=1)  # [M, S, K]
  q_ref = qs * jnp.exp(bs - b_ref[:, :, None])[:, :, :, None]
  lower = jnp.arange(ns)[None, :] < jnp.arange(ns)[:, None]  # [s, r]: r < s
  k_exp = jnp.where(lower[:, :, None, None], b_ref[:, :, None, None] - bs[:, None], 0.0)
  k_ref = ks[:, None] * jnp.exp(k_exp)  # [M, s, r, j, K]
  off = jnp.einsum("msigk,msrjk->mgsirj", q_ref, k_ref)
  eye = jnp.eye(ns, dtype=bool)
  scores = jnp.where(eye[:, None, :, None], diag[:, :, :, :, None, :],
                     jnp.where(lower[:, None, :, None], off, 0.0))  # [M, G, s, i, r, j]
  scores = scores.reshape(bsz * n, hk, g, c_len, c_len)
  scores = jnp.where(mask.reshape(bsz * n, 1, 1, c_len, c_len), scores, 0.0)
  return scores.reshape(bsz, n, hk, g, c_len, c_len)


def chunk_gla(q, k, v, log_g=None, *, initial_state=None, chunk_size: int = 64,
              sub_chunk: int = 16, scale=None, segment_ids=None, cu_seqlens=None):
  """Chunkwise form, linear in T (see the module docstring for the exact algorithm).

  ``chunk_size`` must be a multiple of ``sub_chunk``; sequences of any length are padded to
  whole chunks internally (padding has zero keys and unit gates, so it changes nothing).
  Sequences shorter than a chunk use one chunk of ``T`` rounded up to ``sub_chunk``.
  Returns ``(o, final_state)`` equal to :func:`recurrent_gla`."""
  if not isinstance(chunk_size, int) or not isinstance(sub_chunk, int) or sub_chunk < 1 or (
      chunk_size < 1 or chunk_size % sub_chunk):
    raise ValueError(f"chunk_gla: chunk_size ({chunk_size}) must be a positive multiple of "
                     f"sub_chunk ({sub_chunk})")
  qg, k32, v32, lg, s0, doc = _prepare("chunk_gla", q, k, v, log_g, initial_state, segment_ids,
                                       cu_seqlens, scale)
  bsz, t, h = q.shape[:3]
  hk, g, kd = qg.shape[2:]
  vd = v.shape[3]
  c_len = min(chunk_size, -(-t // sub_chunk) * sub_chunk)
  n = -(-t // c_len)
  pad = n * c_len - t
  if pad:
    zpad = lambda a: jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    qg, k32, v32, lg = zpad(qg), zpad(k32), zpad(v32), zpad(lg)
    doc = jnp.pad(doc, [(0, 0), (0, pad)], mode="edge")
  chunked = lambda a: a.reshape(bsz, n, c_len, *a.shape[2:])
  qc, kc, vc, lgc, docc = chunked(qg), chunked(k32), chunked(v32), chunked(lg), chunked(doc)
  cum = jnp.cumsum(lgc, axis=2)  # float32, relative to the chunk start
  cum_last = cum[:, :, -1]  # [B, N, Hk, Kd]

  # Which document the state entering each chunk belongs to (initial state: document 0).
  doc_prev = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32), docc[:, :-1, -1]], axis=1)
  doc_last = docc[:, :, -1]
  reads_state = docc == doc_prev[:, :, None]  # [B, N, C]
  keeps_state = doc_last == doc_prev  # [B, N]

  # Per-chunk state contribution and decay, then the sequential pass over chunks.
  w = _masked_exp(cum_last[:, :, None] - cum, (docc == doc_last[:, :, None])[..., None, None])
  delta = jnp.einsum("bnchk,bnchv->bnhkv", kc * w, vc)
  decay = jnp.where(keeps_state[..., None, None], jnp.exp(cum_last), 0.0)[..., None]

  def carry(state, xs):
    decay_n, delta_n = xs
    return decay_n * state + delta_n, state

  final, states_in = jax.lax.scan(carry, s0, (jnp.moveaxis(decay, 1, 0), jnp.moveaxis(delta, 1, 0)))
  o_inter = jnp.einsum("bnchgk,nbhkv->bnchgv", qc * jnp.exp(cum)[:, :, :, :, None], states_in)
  o_inter = jnp.where(reads_state[..., None, None, None], o_inter, 0.0)

  tri = jnp.tril(jnp.ones((c_len, c_len), bool))
  mask = tri & (docc[:, :, :, None] == docc[:, :, None, :])  # [B, N, i, j]
  if lg.shape[-1] == 1:
    scores = _intra_scalar(qc, kc, cum, mask)
  else:
    scores = _intra_vector(qc, kc, cum, mask, sub_chunk)
  o_intra = jnp.einsum("bnhgij,bnjhv->bnihgv", scores, vc)
  o = (o_inter + o_intra).reshape(bsz, n * c_len, h, vd)[:, :t]
  return o.astype(q.dtype), final


FORMS = {"recurrent": recurrent_gla, "parallel": parallel_gla, "chunk": chunk_gla}


def run(form: str, q, k, v, log_g=None, *, initial_state=None, scale=None, segment_ids=None,
        chunk_size: int = 64, sub_chunk: int = 16):
  """Dispatch to one form by name (``recurrent``, ``parallel``, ``chunk``); a single token with
  a state uses :func:`gla_step`. Returns ``(o, final_state)``."""
  if form not in FORMS:
    raise ValueError(f"unknown linear-attention form '{form}'; allowed: {sorted(FORMS)}")
  if q.shape[1] == 1 and segment_ids is None:
    o, state = gla_step(q[:, 0], k[:, 0], v[:, 0], None if log_g is None else log_g[:, 0],
                        jnp.zeros((k.shape[0], k.shape[2], k.shape[3], v.shape[3]), jnp.float32)
                        if initial_state is None else initial_state, scale=scale)
    return o[:, None], state
  kw = dict(initial_state=initial_state, scale=scale, segment_ids=segment_ids)
  if form == "chunk":
    kw.update(chunk_size=chunk_size, sub_chunk=sub_chunk)
  return FORMS[form](q, k, v, log_g, **kw)
