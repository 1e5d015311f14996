"""What every kernel family shares: implementation names, the dtypes kernels take, backend
selection from where a computation is placed, one-time fallback warnings, and running a
per-shard kernel body over a mesh."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxblocks import sharding as S

IMPLS = ("auto", "xla", "pallas")
BACKENDS = ("tpu", "gpu")
KERNEL_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))

_log = logging.getLogger("jaxblocks.kernels")
_warned: set[str] = set()


def warn_once(message: str) -> None:
  """Log ``message`` as a warning the first time it is seen in this process."""
  if message not in _warned:
    _warned.add(message)
    _log.warning("%s", message)


def platform_backend(platform: str | None = None) -> str | None:
  """Kernel backend for a JAX platform name (default: the default backend), None for CPU."""
  platform = platform or jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda", "rocm"):
    return "gpu"
  return None


def resolve_mesh(mesh: Mesh | None, rules):
  """``(mesh, rules)``: the given ones, else those of the active ``sharding.use_rules`` context
  (explicit ``rules`` win over the context's)."""
  if mesh is None:
    active = S.active()
    if active is not None:
      mesh, active_rules = active
      rules = rules if rules is not None else active_rules
  return mesh, rules


def placement_backend(mesh: Mesh | None) -> str | None:
  """Kernel backend of the devices the computation is placed on (the given or active mesh, else
  the default backend), so that a program compiled ahead of time for a TPU topology on a CPU
  host gets the TPU kernel."""
  mesh, _ = resolve_mesh(mesh, None)
  return platform_backend(None if mesh is None else mesh.devices.flat[0].platform)


def shard_map_or_call(fn, mesh: Mesh | None, operands, in_specs, out_specs):
  """``fn(*operands)`` on every shard of ``mesh`` (``jax.shard_map``), or directly without one."""
  if mesh is None:
    return fn(*operands)
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(in_specs), out_specs=tuple(out_specs),
                       check_vma=False)(*operands)


def choose_backend(impl: str, backend: str | None, mesh: Mesh | None, interpret):
  """``(backend, interpret)`` for a kernel call, or ``(None, None)`` for the XLA path.

  ``impl="xla"`` always takes XLA; ``"auto"`` takes it where the computation is placed on no
  kernel platform (CPU); otherwise the explicit ``backend``, else the placement's, else TPU.
  ``interpret=None`` interprets exactly when the chosen backend is not the placement's."""
  if impl == "xla":
    return None, None
  placed = placement_backend(mesh)
  if impl == "auto" and placed is None:
    return None, None
  backend = backend or placed or "tpu"
  return backend, (placed != backend) if interpret is None else interpret
