"""Public entry point of the chunked gated-linear-attention kernels: :func:`chunk_gla`.

Same arguments, semantics and results as :func:`jaxblocks.attention.linear_ops.chunk_gla` (the
XLA reference): ``q[B, T, H, K]``, ``k[B, T, Hk, K]``, ``v[B, T, Hk, V]``, log-gates per key dim
``[B, T, Hk, K]``, per head ``[B, T, Hk]`` or None, ``initial_state[B, Hk, K, V]``, packed
sequences through ``segment_ids`` / ``cu_seqlens``; returns ``(o, final_state)``.

``impl``:
  * ``"xla"``: the reference chunkwise form, differentiated by JAX.
  * ``"pallas"``: the Pallas kernels (TPU: Mosaic; GPU: Triton) under a ``custom_vjp`` whose
    backward is two more kernels (dq in forward order recomputing the chunk states, dk/dv and the
    initial-state gradient in reverse order; nothing per chunk is stored). On CPU the TPU kernel
    runs in interpret mode (``backend`` picks the kernel, ``interpret`` the interpreter).
    Unsupported inputs raise ``ValueError``.
  * ``"auto"`` (default): the kernels on TPU and GPU, XLA on CPU; inputs the kernels do not
    support fall back to XLA with a warning logged once per reason.

Sharding. ``pallas_call`` cannot be partitioned by XLA, so under a mesh (``mesh=``/``rules=`` or
the active :func:`jaxblocks.sharding.use_rules` context) forward and backward each run inside
``jax.shard_map``, split over ``batch`` and ``heads``/``kv_heads`` as the rules say (heads only
when query and key/value heads split alike).

Context parallelism. When the rules also map ``seq`` to mesh axes (the ``cp`` preset maps it to
``sequence``), every device holds a slice of the sequence:

1. it computes, in XLA, the state its slice produces from zero, ``S_loc = Σ_j (k_j ⊙
   e^{B_end − B_j})ᵀ v_j`` (last document of the slice only) and its total decay ``D = e^{B_end}``
   (0 if a document starts inside the slice or at its first token);
2. the ``(S_loc, D)`` pairs are all-gathered over the sequence axes (LASP-2 style) and every
   device combines ``S_in(r+1) = D(r) ⊙ S_in(r) + S_loc(r)`` from ``S_in(0) = initial_state``;
3. it runs the kernel on its slice from ``S_in(r)``, so its outputs include the incoming-state
   term ``(q ⊙ e^B) S_in``; the final state is the last slice's.

The backward is the mirror image: each device runs the backward kernels from its ``S_in``, the
cotangents of the incoming states are all-gathered and combined right to left
(``Λ(r) = dS_in(r) + D(r) ⊙ Λ(r+1)``), and each device adds the gradients of its ``(S_loc, D)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxblocks import sharding as S
from jaxblocks.attention import linear_ops
from jaxblocks.kernels.gla import layout
from jaxblocks.kernels import common
from jaxblocks.kernels.common import BACKENDS, IMPLS, KERNEL_DTYPES

F32 = jnp.float32


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def _unsupported_reason(q, k, v, log_g, backend, chunk_size, sub_chunk, block_v) -> str | None:
  bad = sorted({str(a.dtype) for a in (q, k, v) if np.dtype(a.dtype) not in KERNEL_DTYPES})
  if bad:
    return f"dtype(s) {bad} (kernels take bfloat16/float32)"
  if log_g is not None and np.dtype(log_g.dtype) not in KERNEL_DTYPES:
    return f"log_g dtype {log_g.dtype}"
  if 0 in q.shape or 0 in v.shape:
    return f"empty input q {q.shape} v {v.shape}"
  vd = v.shape[3]
  if backend == "tpu":
    align = 16 if np.dtype(jnp.bfloat16) in {np.dtype(a.dtype) for a in (q, k, v)} else 8
    if sub_chunk % align:
      return f"sub_chunk {sub_chunk} (TPU needs a multiple of {align} for these dtypes)"
    if block_v is not None and (vd % block_v or (block_v != vd and block_v % 128)):
      return f"block_v {block_v} (TPU needs V={vd} or a multiple of 128 dividing it)"
  else:
    if not (_is_pow2(chunk_size) and _is_pow2(sub_chunk) and sub_chunk >= 16):
      return (f"chunk_size {chunk_size} / sub_chunk {sub_chunk} (Triton needs powers of two, "
              f"sub_chunk >= 16)")
    if block_v is not None and (not _is_pow2(block_v) or block_v < 16):
      return f"block_v {block_v} (Triton needs a power of two >= 16)"
  return None


# ----------------------------------------------------------------------------- sharding plan


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Mesh axes of each array dimension; ``mesh`` None means no shard_map."""

  mesh: Mesh | None
  batch: Any = None
  seq: Any = None
  heads: Any = None

  @property
  def seq_axes(self) -> tuple[str, ...]:
    if self.seq is None:
      return ()
    return (self.seq,) if isinstance(self.seq, str) else tuple(self.seq)

  def btd(self):  # [B, T, heads, dim]
    return P(self.batch, self.seq, self.heads, None)

  def bt(self):
    return P(self.batch, self.seq)

  def gate(self, ndim):
    return P(self.batch, self.seq, self.heads, *([None] * (ndim - 3)))

  def state(self):
    return P(self.batch, self.heads, None, None)


def _layout(q, k, mesh, rules) -> _Layout:
  mesh, rules = common.resolve_mesh(mesh, rules)
  if mesh is None or mesh.size == 1:
    return _Layout(None)
  q_spec = tuple(S.logical_to_spec(("batch", "seq", "heads", None), rules, mesh, q.shape))
  k_spec = tuple(S.logical_to_spec(("batch", "seq", "kv_heads", None), rules, mesh, k.shape))
  q_spec += (None,) * (4 - len(q_spec))
  k_spec += (None,) * (4 - len(k_spec))
  heads = q_spec[2] if q_spec[2] == k_spec[2] else None
  if heads is not None and q_spec[:2] != k_spec[:2]:
    heads = None
  return _Layout(mesh, q_spec[0], q_spec[1], heads)


def _map(fn, lay: _Layout, operands, in_specs, out_specs):
  return common.shard_map_or_call(fn, lay.mesh, operands, in_specs, out_specs)


# ----------------------------------------------------------------------------- context parallel


def _local_doc(change):
  """Per-slice document index from the global "new document here" flags (first token excluded:
  a document starting at the slice's first token is reported by ``change[:, 0]``)."""
  if change is None:
    return None, None
  inner = change.at[:, 0].set(0)
  return jnp.cumsum(inner, axis=1, dtype=jnp.int32), change[:, 0].astype(bool)


def slice_state(k, v, log_g, doc, reset_first):
  """``(S_loc[B, Hk, K, V], D[B, Hk, K])``: the state a sequence slice produces from zero and the
  decay it applies to the state entering it (XLA, float32; differentiable)."""
  bsz, t, hk, kd = k.shape
  if log_g is None:
    lg = jnp.zeros((bsz, t, hk, 1), F32)
  else:
    lg = log_g.astype(F32)
    lg = lg[..., None] if lg.ndim == 3 else lg
  cum = jnp.cumsum(lg, axis=1)
  cum_end = cum[:, -1]
  if doc is None:
    w = jnp.exp(cum_end[:, None] - cum)
    passes = jnp.ones((bsz,), bool)
  else:
    in_last = (doc == doc[:, -1:])[:, :, None, None]
    w = jnp.exp(jnp.where(in_last, cum_end[:, None] - cum, -jnp.inf))
    passes = (doc[:, -1] == 0) & ~reset_first
  s_loc = jnp.einsum("bthk,bthv->bhkv", k.astype(F32) * w, v.astype(F32))
  decay = jnp.where(passes[:, None, None], jnp.exp(cum_end), 0.0)
  return s_loc, jnp.broadcast_to(decay, (bsz, hk, kd))


def _incoming_states(s0, s_loc_all, decay_all):
  """``S_in(r)`` for every slice ``r`` from the gathered ``[R, ...]`` pairs."""
  def step(s_in, xs):
    s_loc, decay = xs
    return decay[..., None] * s_in + s_loc, s_in

  _, s_in_all = jax.lax.scan(step, s0, (s_loc_all, decay_all))
  return s_in_all


def _incoming_adjoints(ds_init_all, keep_all, decay_all):
  """``Λ(r) = keep(r) ⊙ dS_init(r) + D(r) ⊙ Λ(r+1)`` (``Λ(R) = 0``) for every ``r``."""
  def step(lam_next, xs):
    ds_init, keep, decay = xs
    lam = jnp.where(keep[:, None, None, None], ds_init, 0.0) + decay[..., None] * lam_next
    return lam, lam

  _, lam_all = jax.lax.scan(step, jnp.zeros_like(ds_init_all[0]),
                            (ds_init_all, keep_all, decay_all), reverse=True)
  return lam_all


# ----------------------------------------------------------------------------- kernel path


def _kernel_call(cfg: layout.KernelConfig, lay: _Layout, gate_ndim):
  """A ``custom_vjp`` function ``(q, k, v, log_g, s0, change) -> (o, final_state)``."""
  seq_axes = lay.seq_axes
  cp = bool(seq_axes)

  def context(k, v, log_g, s0, change):
    """Per slice: document index, the kernel's initial state, and what the backward needs."""
    doc, reset_first = _local_doc(change)
    if not cp:
      return doc, s0, None
    if reset_first is None:
      reset_first = jnp.zeros((k.shape[0],), bool)
    s_loc, decay = slice_state(k, v, log_g, doc, reset_first)
    gather = lambda x: jax.lax.all_gather(x, seq_axes)
    s_in_all = _incoming_states(s0, gather(s_loc), gather(decay))
    r = jax.lax.axis_index(seq_axes)
    s_in = s_in_all[r]
    s_init = jnp.where(reset_first[:, None, None, None], 0.0, s_in)
    return doc, s_init, (s_loc, decay, s_in, reset_first, r, gather(decay), gather(~reset_first))

  def forward_local(q, k, v, log_g, s0, change):
    doc, s_init, extra = context(k, v, log_g, s0, change)
    o, final = layout.forward(cfg, q, k, v, log_g, s_init, doc)
    if cp:
      r = extra[4]
      last = r == jax.lax.axis_size(seq_axes) - 1
      final = jax.lax.psum(jnp.where(last, final, 0.0), seq_axes)
    return o, final

  def backward_local(q, k, v, log_g, s0, change, final, do, dfinal):
    doc, s_init, extra = context(k, v, log_g, s0, change)
    if cp:
      r = extra[4]
      dfinal = jnp.where(r == jax.lax.axis_size(seq_axes) - 1, dfinal, 0.0)
    dq, dk, dv, dlog_g, ds_init = layout.backward(cfg, q, k, v, log_g, s_init, doc, final, do,
                                                  dfinal)
    if not cp:
      return dq, dk, dv, dlog_g, ds_init
    _, decay, s_in, reset_first, r, decay_all, keep_all = extra
    lam_all = _incoming_adjoints(jax.lax.all_gather(ds_init, seq_axes), keep_all, decay_all)
    n_slices = lam_all.shape[0]
    lam_next = jnp.where(r + 1 < n_slices, lam_all[jnp.minimum(r + 1, n_slices - 1)], 0.0)
    ds_loc = lam_next
    d_decay = jnp.sum(s_in * lam_next, axis=-1)
    _, vjp = jax.vjp(lambda k_, v_, g_: slice_state(k_, v_, g_, doc, reset_first), k, v, log_g)
    dk2, dv2, dg2 = vjp((ds_loc, d_decay))
    dk = (dk.astype(F32) + dk2.astype(F32)).astype(k.dtype)
    dv = (dv.astype(F32) + dv2.astype(F32)).astype(v.dtype)
    if dlog_g is not None:
      dlog_g = dlog_g.astype(F32) + dg2.astype(F32)
      first = reset_first.reshape((-1,) + (1,) * (dlog_g.ndim - 2))
      dlog_g = dlog_g.at[:, 0].set(jnp.where(first, 0.0, dlog_g[:, 0])).astype(log_g.dtype)
    return dq, dk, dv, dlog_g, lam_all[0]

  has_gate = gate_ndim is not None
  gate_spec = [lay.gate(gate_ndim)] if has_gate else []

  def pack(q, k, v, log_g, s0, change):
    ops = [q, k, v] + ([log_g] if has_gate else []) + [s0] + ([change] if change is not None
                                                             else [])
    specs = [lay.btd()] * 3 + gate_spec + [lay.state()] + ([lay.bt()] if change is not None
                                                           else [])
    return ops, specs

  def unpack(ops, has_change):
    ops = list(ops)
    q, k, v = ops[:3]
    rest = ops[3:]
    log_g = rest.pop(0) if has_gate else None
    s0 = rest.pop(0)
    change = rest.pop(0) if has_change else None
    return q, k, v, log_g, s0, change, rest

  def fwd(q, k, v, log_g, s0, change):
    ops, specs = pack(q, k, v, log_g, s0, change)
    has_change = change is not None
    o, final = _map(lambda *a: forward_local(*unpack(a, has_change)[:6]), lay, ops, specs,
                    [lay.btd(), lay.state()])
    return (o, final), (q, k, v, log_g, s0, change, final)

  def bwd(res, cotangents):
    q, k, v, log_g, s0, change, final = res
    do, dfinal = cotangents
    ops, specs = pack(q, k, v, log_g, s0, change)
    has_change = change is not None

    def body(*a):
      q_, k_, v_, g_, s0_, c_, rest = unpack(a, has_change)
      return tuple(x for x in backward_local(q_, k_, v_, g_, s0_, c_, *rest) if x is not None)

    out_specs = [lay.btd()] * 3 + gate_spec + [lay.state()]
    grads = list(_map(body, lay, ops + [final, do.astype(q.dtype), dfinal.astype(F32)],
                      specs + [lay.state(), lay.btd(), lay.state()], out_specs))
    dq, dk, dv = grads[:3]
    dlog_g = grads[3] if has_gate else None
    ds0 = grads[-1]
    dchange = None if change is None else np.zeros(change.shape, jax.dtypes.float0)
    return dq, dk, dv, dlog_g, ds0, dchange

  @jax.custom_vjp
  def call(q, k, v, log_g, s0, change):
    return fwd(q, k, v, log_g, s0, change)[0]

  call.defvjp(fwd, bwd)
  return call


# ----------------------------------------------------------------------------- public API


def chunk_gla(q: jax.Array, k: jax.Array, v: jax.Array, log_g: jax.Array | None = None, *,
              initial_state: jax.Array | None = None, scale: float | None = None,
              segment_ids: jax.Array | None = None, cu_seqlens: jax.Array | None = None,
              chunk_size: int = 64, sub_chunk: int = 16, impl: str = "auto",
              backend: str | None = None, interpret: Any = None, block_v: int | None = None,
              mesh: Mesh | None = None, rules: S.Rules | str | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """Chunked gated linear attention: ``(o[B, T, H, V] in q.dtype, final_state[B, Hk, K, V]
  float32)``.

  Args:
    q, k, v, log_g, initial_state, scale, segment_ids, cu_seqlens, chunk_size, sub_chunk: as in
      :func:`jaxblocks.attention.linear_ops.chunk_gla`.
    impl: ``"auto"``, ``"xla"`` or ``"pallas"`` (see the module docstring).
    backend: ``"tpu"``/``"gpu"`` kernel (default: the platform's; the TPU kernel on CPU).
    interpret: Pallas interpret mode (``True`` or ``pltpu.InterpretParams(...)``); default: on
      when no accelerator of ``backend``'s kind is present.
    block_v: value-tile width per program (default: whole V on TPU up to 512, 128 on GPU).
    mesh, rules: sharding (defaults: the active ``use_rules`` context). ``seq`` mapped to mesh
      axes turns on context parallelism.
  """
  if impl not in IMPLS:
    raise ValueError(f"chunk_gla: impl must be one of {IMPLS}, got {impl!r}")
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"chunk_gla: backend must be one of {BACKENDS} or None, got {backend!r}")
  if not isinstance(chunk_size, int) or not isinstance(sub_chunk, int) or sub_chunk < 1 or (
      chunk_size < 1 or chunk_size % sub_chunk):
    raise ValueError(f"chunk_gla: chunk_size ({chunk_size}) must be a positive multiple of "
                     f"sub_chunk ({sub_chunk})")
  if block_v is not None and (not isinstance(block_v, int) or block_v < 1):
    raise ValueError(f"chunk_gla: block_v must be a positive int, got {block_v!r}")
  segment_ids = linear_ops._resolve_segments("chunk_gla", q, segment_ids, cu_seqlens)
  linear_ops._check("chunk_gla", q, k, v, log_g, initial_state, segment_ids)

  def run_reference():
    return linear_ops.chunk_gla(q, k, v, log_g, initial_state=initial_state,
                                chunk_size=chunk_size, sub_chunk=sub_chunk, scale=scale,
                                segment_ids=segment_ids)

  backend, interpret = common.choose_backend(impl, backend, mesh, interpret)
  if backend is None:
    return run_reference()
  reason = _unsupported_reason(q, k, v, log_g, backend, chunk_size, sub_chunk, block_v)
  if reason is not None:
    message = f"chunk_gla: no {backend} kernel for {reason}"
    if impl == "pallas":
      raise ValueError(message)
    common.warn_once(message + "; using the XLA path")
    return run_reference()
  cfg = layout.KernelConfig(backend=backend, chunk_size=chunk_size, sub_chunk=sub_chunk,
                            scale=None if scale is None else float(scale), block_v=block_v,
                            interpret=interpret)
  bsz, t, hk = k.shape[:3]
  s0 = (jnp.zeros((bsz, hk, k.shape[3], v.shape[3]), F32) if initial_state is None
        else initial_state.astype(F32))
  change = None
  if segment_ids is not None:
    change = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32),
                              (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], 1)
  lay = _layout(q, k, mesh, rules)
  call = _kernel_call(cfg, lay, None if log_g is None else log_g.ndim)
  return call(q, k, v, log_g, s0, change)
