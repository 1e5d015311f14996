"""Meshes, logical-axis rules and activation sharding constraints.

Model code names dimensions logically (``batch``, ``seq``, ``embed``, ``heads`` ...). A *rules*
table maps each logical name to zero, one or several mesh axes (``data``, ``fsdp``,
``sequence``, ``tensor``). Changing the parallelism strategy is changing the rules; model code
never mentions a mesh axis.

    mesh = make_mesh({"data": 2, "fsdp": -1})
    with use_rules(mesh, PRESETS["fsdp"]):
        logits = model.apply(params, tokens, cfg)    # constrain() calls now take effect
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "sequence", "tensor")
LOGICAL_AXES = ("batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                "layers", "state", "norm")

MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Rules:
  """An ordered logical-axis → mesh-axes table.

  ``Rules({"batch": ("data", "fsdp"), "embed": "fsdp"})``. Logical names missing from the table
  are replicated. A mesh axis is used at most once per array: when two dimensions of one array
  ask for the same mesh axis, the first one keeps it.
  """

  table: tuple[tuple[str, MeshAxes], ...]

  def __init__(self, table: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]] = ()):
    items = tuple(table.items()) if isinstance(table, Mapping) else tuple(table)
    for name, axes in items:
      for a in _as_tuple(axes):
        if a not in MESH_AXES:
          raise ValueError(f"Rules: logical axis '{name}' maps to unknown mesh axis '{a}'; "
                           f"mesh axes are {MESH_AXES}")
    object.__setattr__(self, "table", items)

  def get(self, name: str | None) -> tuple[str, ...]:
    if name is None:
      return ()
    for k, v in self.table:
      if k == name:
        return _as_tuple(v)
    return ()

  def replace(self, **updates: MeshAxes) -> "Rules":
    d = dict(self.table)
    d.update(updates)
    return Rules(d)


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  if isinstance(axes, str):
    return (axes,)
  return tuple(axes)


# Presets. ``batch`` always spans every data-like axis; the rest says where weights live.
PRESETS: dict[str, Rules] = {
    # Pure data parallel: weights replicated.
    "dp": Rules({"batch": ("data", "fsdp")}),
    # Fully sharded data parallel (ZeRO-3): weights sharded on their embed dimension over fsdp.
    "fsdp": Rules({"batch": ("data", "fsdp"), "embed": "fsdp", "vocab": None}),
    # FSDP + tensor (Megatron) parallel: heads/mlp/vocab over tensor, embed over fsdp.
    "fsdp_tp": Rules({"batch": ("data", "fsdp"), "embed": "fsdp", "heads": "tensor",
                      "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}),
    # Sequence (context) parallel: activations split along time, weights FSDP-sharded.
    "sp": Rules({"batch": ("data", "fsdp"), "seq": "sequence", "embed": "fsdp"}),
    # Context parallel for long sequences: time split over sequence, heads over tensor, weights
    # FSDP-sharded. Linear-attention kernels exchange their states across the sequence axis.
    "cp": Rules({"batch": ("data", "fsdp"), "seq": "sequence", "embed": "fsdp",
                 "heads": "tensor", "kv_heads": "tensor"}),
}


def get_rules(rules: Rules | str | None) -> Rules:
  if rules is None:
    return PRESETS["dp"]
  if isinstance(rules, Rules):
    return rules
  if rules not in PRESETS:
    raise ValueError(f"unknown sharding preset '{rules}'; choose one of {sorted(PRESETS)}")
  return PRESETS[rules]


def make_mesh(axis_sizes: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Build a mesh over all ``MESH_AXES`` from named sizes; ``-1`` means "the rest".

  Axes that are not named get size 1, so every rules table works on every mesh.
  """
  axis_sizes = dict(axis_sizes or {"data": -1})
  for k in axis_sizes:
    if k not in MESH_AXES:
      raise ValueError(f"make_mesh: unknown mesh axis '{k}'; valid axes are {MESH_AXES}")
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {a: int(axis_sizes.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"make_mesh: at most one axis may be -1, got {free}")
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f"make_mesh: axis '{a}' has invalid size {s}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n % known:
      raise ValueError(f"make_mesh: {n} devices are not divisible by the fixed axes {axis_sizes}")
    sizes[free[0]] = n // known
  if math.prod(sizes.values()) != n:
    raise ValueError(f"make_mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                     f"but there are {n} devices")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # Non-TPU topologies that mesh_utils cannot optimise.
    dev_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(dev_array, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules | str | None = None,
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None) -> P:
  """``PartitionSpec`` for an array with the given logical axes.

  With ``mesh`` and ``shape``, a dimension that the mesh axes do not divide stays replicated
  (so a 3-head model still runs on a 4-way tensor mesh), and size-1 mesh axes are dropped.
  """
  rules = get_rules(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    axes = tuple(a for a in rules.get(name) if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes:
        # Keep the longest prefix of mesh axes that divides the dimension.
        kept = []
        for a in axes:
          if shape[i] % (math.prod(mesh.shape[b] for b in kept) * mesh.shape[a]) == 0:
            kept.append(a)
          else:
            break
        axes = tuple(kept)
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


# ----------------------------------------------------------------------------- active context

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxblocks_sharding", default=None)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules | str | None = None):
  """Make ``constrain`` annotate activations for ``mesh`` and ``rules`` in this block."""
  token = _ACTIVE.set((mesh, get_rules(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
  return _ACTIVE.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axis names; a no-op outside ``use_rules``."""
  ctx = _ACTIVE.get()
  if ctx is None:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an "
                     f"array of rank {x.ndim} (shape {x.shape})")
  mesh, rules = ctx
  spec = logical_to_spec(logical_axes, rules, mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def named_sharding(logical_axes: Sequence[str | None], mesh: Mesh, rules: Rules | str | None = None,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical_axes, rules, mesh, shape))
