"""Public entry points of the fused normalization kernels.

``fused_add_norm`` computes ``y = Norm(x + residual) [* swish(gate)]`` and returns ``(y,
new_residual)``; ``norm`` is the same without a residual. Semantics (and the XLA path) are
:mod:`jaxblocks.kernels.norm.reference`.

``impl``:
  * ``"xla"``: the reference, differentiated by JAX.
  * ``"pallas"``: the Pallas kernel (TPU: Mosaic; GPU: Triton) with a ``custom_vjp`` whose backward
    is a second kernel. On CPU it runs the TPU kernel in interpret mode (``backend`` picks the
    kernel, ``interpret`` the interpreter). Unsupported inputs raise ``ValueError``.
  * ``"auto"`` (default): the kernel on TPU and GPU, XLA on CPU; inputs the kernels do not
    support (dtypes other than bfloat16/float32, rows too wide for VMEM or registers) fall back to
    XLA with a warning logged once per reason.

Sharding. ``pallas_call`` cannot be partitioned by XLA, so under a mesh (``mesh=``/``rules=`` or
the active :func:`jaxblocks.sharding.use_rules` context) forward and backward each run inside
``jax.shard_map``: rows split as the logical axes of ``x`` say (``batch``/``seq`` by default), the
feature axis whole on every shard (gathered if it was sharded), weight and bias replicated inside
the map (gathered from an ``embed``/``norm`` sharding at the boundary), and their gradients summed
with ``psum`` over the mesh axes that split the rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from jaxblocks import sharding as S
from jaxblocks.kernels import common
from jaxblocks.kernels.common import BACKENDS, IMPLS, KERNEL_DTYPES
from jaxblocks.kernels.norm import gpu as gpu_kernels
from jaxblocks.kernels.norm import reference
from jaxblocks.kernels.norm import tpu as tpu_kernels
from jaxblocks.kernels.norm.rows import NormSpec

KINDS = reference.KINDS


# ----------------------------------------------------------------------------- validation


def _check_inputs(x, residual, weight, bias, gate, kind, eps, impl, backend):
  if impl not in IMPLS:
    raise ValueError(f"norm kernels: impl must be one of {IMPLS}, got {impl!r}")
  if kind not in KINDS:
    raise ValueError(f"norm kernels: kind must be one of {KINDS}, got {kind!r}")
  if backend is not None and backend not in BACKENDS:
    raise ValueError(f"norm kernels: backend must be one of {BACKENDS} or None, got {backend!r}")
  if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
    raise ValueError(f"norm kernels: eps must be a non-negative number, got {eps!r}")
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"norm kernels: x must have at least one axis, got shape "
                     f"{getattr(x, 'shape', None)}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"norm kernels: x must be floating point, got dtype {x.dtype}")
  for name, arr in (("residual", residual), ("gate", gate)):
    if arr is None:
      continue
    if arr.shape != x.shape:
      raise ValueError(f"norm kernels: {name} shape {arr.shape} must equal x shape {x.shape}")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
      raise ValueError(f"norm kernels: {name} must be floating point, got dtype {arr.dtype}")
  for name, arr in (("weight", weight), ("bias", bias)):
    if arr is not None and arr.shape != x.shape[-1:]:
      raise ValueError(f"norm kernels: {name} shape {arr.shape} must be ({x.shape[-1]},), the "
                       f"last axis of x {x.shape}")


def _unsupported_reason(spec: NormSpec, backend: str, n_rows: int, d: int) -> str | None:
  dtypes = {spec.x_dtype, spec.residual_in_dtype, spec.residual_dtype}
  bad = sorted(str(t) for t in dtypes if np.dtype(t) not in KERNEL_DTYPES)
  if bad:
    return f"dtype(s) {bad} (kernels take bfloat16/float32)"
  if n_rows == 0 or d == 0:
    return f"empty input ({n_rows} rows x {d})"
  if backend == "tpu":
    big = 1 << 20
    if (tpu_kernels.forward_block_rows(spec, big, d) is None
        or tpu_kernels.backward_block_rows(spec, big, d) is None):
      return f"width {d} (8 rows exceed the TPU VMEM budget)"
  elif not gpu_kernels.supports_width(d):
    return f"width {d} (above {gpu_kernels.MAX_BLOCK_COLS} columns per row tile)"
  return None


# ----------------------------------------------------------------------------- sharding plan


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Where rows live: ``mesh`` None means no shard_map; ``lead`` are the specs of the row axes."""

  mesh: Mesh | None
  lead: tuple[Any, ...]
  row_axes: tuple[str, ...]

  @property
  def rows_spec(self) -> P:
    return P(*self.lead, None)


def _default_logical_axes(ndim: int) -> tuple[str | None, ...]:
  if ndim == 1:
    return ("embed",)
  if ndim == 2:
    return ("batch", "embed")
  return ("batch", "seq") + (None,) * (ndim - 3) + ("embed",)


def _layout(x, mesh, rules, logical_axes) -> _Layout:
  mesh, rules = common.resolve_mesh(mesh, rules)
  if mesh is None or mesh.size == 1:
    return _Layout(None, (), ())
  axes = tuple(logical_axes) if logical_axes is not None else _default_logical_axes(x.ndim)
  if len(axes) != x.ndim:
    raise ValueError(f"norm kernels: {len(axes)} logical axes {axes} for x of shape {x.shape}")
  spec = tuple(S.logical_to_spec(axes, rules, mesh, x.shape))
  spec = spec + (None,) * (x.ndim - len(spec))
  lead = spec[:-1]  # the feature axis is always whole inside the kernel
  row_axes = tuple(a for entry in lead if entry is not None
                   for a in ((entry,) if isinstance(entry, str) else entry))
  return _Layout(mesh, lead, row_axes)


def _map(fn, layout: _Layout, operands, in_specs, out_specs):
  return common.shard_map_or_call(fn, layout.mesh, operands, in_specs, out_specs)


# ----------------------------------------------------------------------------- kernel path


def _kernel_call(spec: NormSpec, backend: str, layout: _Layout, interpret, block_rows,
                 returns_residual: bool):
  """A ``custom_vjp`` function ``(x, residual, w32, b32, gate) -> y or (y, new_residual)``."""
  kernels = tpu_kernels if backend == "tpu" else gpu_kernels
  rows_spec = layout.rows_spec
  vec_spec = P(None)

  def as_vector(v):  # weight/bias layout each backend expects
    return None if v is None else (v.reshape(1, -1) if backend == "tpu" else v)

  def forward_local(*ops):
    ops = list(ops)
    x = ops.pop(0)
    residual = ops.pop(0) if spec.has_residual else None
    w = ops.pop(0) if spec.has_weight else None
    b = ops.pop(0) if spec.has_bias else None
    g = ops.pop(0) if spec.has_gate else None
    d = x.shape[-1]
    flat = lambda a: None if a is None else a.reshape(-1, d)
    n_rows = flat(x).shape[0]
    kwargs = {"interpret": interpret}
    if backend == "tpu":
      kwargs["block_rows"] = block_rows or tpu_kernels.forward_block_rows(spec, n_rows, d)
    else:
      kwargs["block_rows"] = block_rows
    y, new_res, mean, rstd = kernels.forward(flat(x), flat(residual), as_vector(w), as_vector(b),
                                             flat(g), spec, **kwargs)
    stat_shape = x.shape[:-1] + (1,)
    out = [y.reshape(x.shape)]
    if spec.writes_residual:
      out.append(new_res.reshape(x.shape))
    if mean is not None:
      out.append(mean.reshape(stat_shape))
    out.append(rstd.reshape(stat_shape))
    return tuple(out)

  def backward_local(*ops):
    ops = list(ops)
    h = ops.pop(0)
    g = ops.pop(0) if spec.has_gate else None
    w = ops.pop(0) if spec.has_weight else None
    b = ops.pop(0) if (spec.has_bias and spec.has_gate) else None
    mean = ops.pop(0) if spec.kind == "layer" else None
    rstd = ops.pop(0)
    dy = ops.pop(0)
    dr = ops.pop(0) if spec.writes_residual else None
    d = h.shape[-1]
    flat = lambda a: None if a is None else a.reshape(-1, d)
    stat = lambda a: None if a is None else (a.reshape(-1, 1) if backend == "tpu"
                                             else a.reshape(-1))
    n_rows = flat(h).shape[0]
    kwargs = {"interpret": interpret}
    if backend == "tpu":
      kwargs["block_rows"] = block_rows or tpu_kernels.backward_block_rows(spec, n_rows, d)
    else:
      kwargs["block_rows"] = block_rows
    dx, dres, dg, dw, db = kernels.backward(flat(h), flat(g), as_vector(w), as_vector(b),
                                            stat(mean), stat(rstd), flat(dy), flat(dr), spec,
                                            **kwargs)
    out = [dx.reshape(h.shape)]
    if dres is not None:
      out.append(dres.reshape(h.shape))
    if dg is not None:
      out.append(dg.reshape(h.shape))
    for grad in (dw, db):
      if grad is not None:
        out.append(jax.lax.psum(grad, layout.row_axes) if layout.row_axes else grad)
    return tuple(out)

  def fwd(x, residual, w32, b32, gate):
    operands, in_specs = [x], [rows_spec]
    for present, arr, s in ((spec.has_residual, residual, rows_spec),
                            (spec.has_weight, w32, vec_spec), (spec.has_bias, b32, vec_spec),
                            (spec.has_gate, gate, rows_spec)):
      if present:
        operands.append(arr)
        in_specs.append(s)
    n_out = 1 + int(spec.writes_residual) + (2 if spec.kind == "layer" else 1)
    outs = list(_map(forward_local, layout, operands, in_specs, [rows_spec] * n_out))
    y = outs.pop(0)
    new_res = outs.pop(0) if spec.writes_residual else None
    mean = outs.pop(0) if spec.kind == "layer" else None
    rstd = outs.pop(0)
    h = new_res if spec.writes_residual else x
    saved = (h, gate, w32, b32 if spec.has_gate else None, mean, rstd)
    primal = (y, new_res if spec.writes_residual else x) if returns_residual else y
    return primal, saved

  def bwd(saved, cotangents):
    h, gate, w32, b32, mean, rstd = saved
    if returns_residual:
      dy, dr = cotangents
    else:
      dy, dr = cotangents, None
    operands, in_specs = [h], [rows_spec]
    for present, arr, s in ((spec.has_gate, gate, rows_spec), (spec.has_weight, w32, vec_spec),
                            (spec.has_bias and spec.has_gate, b32, vec_spec),
                            (spec.kind == "layer", mean, rows_spec), (True, rstd, rows_spec),
                            (True, dy.astype(spec.x_dtype), rows_spec),
                            (spec.writes_residual, dr, rows_spec)):
      if present:
        operands.append(arr)
        in_specs.append(s)
    out_specs = [rows_spec] * (1 + int(spec.separate_residual_grad) + int(spec.has_gate))
    out_specs += [vec_spec] * (int(spec.has_weight) + int(spec.has_bias))
    outs = list(_map(backward_local, layout, operands, in_specs, out_specs))
    dx = outs.pop(0)
    dres = outs.pop(0) if spec.separate_residual_grad else dx
    dg = outs.pop(0).astype(gate.dtype) if spec.has_gate else None
    dw = outs.pop(0) if spec.has_weight else None
    db = outs.pop(0) if spec.has_bias else None
    if returns_residual and not spec.writes_residual:
      dx = dx + dr.astype(dx.dtype)  # new_residual is x itself
    return dx, dres if spec.has_residual else None, dw, db, dg

  @jax.custom_vjp
  def call(x, residual, w32, b32, gate):
    return fwd(x, residual, w32, b32, gate)[0]

  call.defvjp(fwd, bwd)
  return call


# ----------------------------------------------------------------------------- public API


def fused_add_norm(x: jax.Array, residual: jax.Array | None = None,
                   weight: jax.Array | None = None, bias: jax.Array | None = None, *,
                   kind: str = "rms", eps: float = 1e-6, scale_offset: float = 0.0,
                   gate: jax.Array | None = None, residual_dtype=None, impl: str = "auto",
                   backend: str | None = None, interpret: Any = None,
                   block_rows: int | None = None, mesh: Mesh | None = None,
                   rules: S.Rules | str | None = None,
                   logical_axes: Sequence[str | None] | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """``(y, new_residual)`` with ``new_residual = x + residual`` and ``y = Norm(new_residual)``.

  Args:
    x: ``(..., d)`` bfloat16/float32 sublayer output (or the stream itself without ``residual``).
    residual: the residual stream, same shape as ``x``, or None (plain norm of ``x``).
    weight, bias: ``(d,)`` gain and bias, or None (weightless norm, e.g. after a FlashNorm fold).
      The gain applied is ``scale_offset + weight``.
    kind: ``"rms"`` or ``"layer"``. eps: added to the mean square / variance.
    gate: optional ``x``-shaped gate; the output is ``Norm(.) * swish(gate)``.
    residual_dtype: dtype of the new residual stream (default ``residual.dtype``, else
      ``x.dtype``); e.g. float32 to keep the stream in full precision. The norm reads the stream
      as stored in this dtype.
    impl: ``"auto"``, ``"xla"`` or ``"pallas"`` (see the module docstring).
    backend: ``"tpu"``/``"gpu"`` kernel (default: the platform's; the TPU kernel on CPU).
    interpret: Pallas interpret mode (``True`` or ``pltpu.InterpretParams(...)``); default: on
      when no accelerator of ``backend``'s kind is present.
    block_rows: override the rows per kernel block (TPU: a multiple of 8; GPU: a power of 2).
    mesh, rules, logical_axes: sharding (defaults: the active ``use_rules`` context and
      ``("batch", "seq", ..., "embed")``).

  Returns:
    ``y`` in ``x.dtype`` and ``new_residual`` in ``residual_dtype``.
  """
  return _dispatch(x, residual, weight, bias, gate, kind=kind, eps=eps, scale_offset=scale_offset,
                   residual_dtype=residual_dtype, impl=impl, backend=backend,
                   interpret=interpret, block_rows=block_rows, mesh=mesh, rules=rules,
                   logical_axes=logical_axes, returns_residual=True)


def norm(x: jax.Array, weight: jax.Array | None = None, bias: jax.Array | None = None, *,
         kind: str = "rms", eps: float = 1e-6, scale_offset: float = 0.0,
         gate: jax.Array | None = None, impl: str = "auto", backend: str | None = None,
         interpret: Any = None, block_rows: int | None = None, mesh: Mesh | None = None,
         rules: S.Rules | str | None = None,
         logical_axes: Sequence[str | None] | None = None) -> jax.Array:
  """``Norm(x) [* swish(gate)]`` over the last axis; arguments as in :func:`fused_add_norm`."""
  return _dispatch(x, None, weight, bias, gate, kind=kind, eps=eps, scale_offset=scale_offset,
                   residual_dtype=None, impl=impl, backend=backend, interpret=interpret,
                   block_rows=block_rows, mesh=mesh, rules=rules, logical_axes=logical_axes,
                   returns_residual=False)


def _dispatch(x, residual, weight, bias, gate, *, kind, eps, scale_offset, residual_dtype, impl,
              backend, interpret, block_rows, mesh, rules, logical_axes, returns_residual):
  _check_inputs(x, residual, weight, bias, gate, kind, eps, impl, backend)
  if residual_dtype is None:
    residual_dtype = (residual if residual is not None else x).dtype
  residual_dtype = np.dtype(residual_dtype)
  if not jnp.issubdtype(residual_dtype, jnp.floating):
    raise ValueError(f"norm kernels: residual_dtype must be floating point, got {residual_dtype}")

  def run_reference():
    y, new_res = reference.fused_add_norm(x, residual, weight, bias, kind=kind, eps=eps,
                                          scale_offset=scale_offset, gate=gate,
                                          residual_dtype=residual_dtype)
    return (y, new_res) if returns_residual else y

  backend, interpret = common.choose_backend(impl, backend, mesh, interpret)
  if backend is None:
    return run_reference()
  spec = NormSpec(kind=kind, eps=float(eps), has_residual=residual is not None,
                  has_weight=weight is not None, has_bias=bias is not None,
                  has_gate=gate is not None, x_dtype=np.dtype(x.dtype).name,
                  residual_in_dtype=np.dtype((residual if residual is not None else x).dtype).name,
                  residual_dtype=residual_dtype.name)
  d = x.shape[-1]
  reason = _unsupported_reason(spec, backend, int(np.prod(x.shape[:-1])), d)
  if reason is not None:
    message = f"fused norm: no {backend} kernel for {reason}"
    if impl == "pallas":
      raise ValueError(message)
    common.warn_once(message + "; using the XLA path")
    return run_reference()
  to_f32 = lambda v: None if v is None else v.astype(jnp.float32)
  w32 = None if weight is None else scale_offset + weight.astype(jnp.float32)
  layout = _layout(x, mesh, rules, logical_axes)
  call = _kernel_call(spec, backend, layout, interpret, block_rows, returns_residual)
  out = call(x, residual, w32, to_f32(bias), gate)
  if returns_residual:
    y, new_res = out
    return y, new_res
  return out
