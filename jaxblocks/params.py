"""Parameter specifications: one declarative description per weight.

A block describes its weights as a pytree (nested dicts) of :class:`ParamSpec` leaves. From
that single description we derive

* the abstract tree (``jax.ShapeDtypeStruct`` with shardings) for ahead-of-time compilation
  and checkpoint restore,
* the ``NamedSharding`` of every weight under a mesh and a logical-axis rules table,
* the parameter count,
* the initialised parameters, produced inside a single ``jax.jit`` whose ``out_shardings``
  place every weight directly on its shards (a model is never materialised on one host).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  """Shape, dtype, logical axis names and initializer of one weight.

  ``logical_axes`` has one name (or ``None``) per dimension; names are mapped to mesh axes by
  :mod:`jaxblocks.sharding`. ``init(key, shape, dtype)`` returns the initial value.
  """

  shape: tuple[int, ...]
  logical_axes: tuple[str | None, ...]
  init: Initializer
  dtype: Any = jnp.float32

  def __post_init__(self):
    shape = tuple(int(s) for s in self.shape)
    object.__setattr__(self, "shape", shape)
    object.__setattr__(self, "logical_axes", tuple(self.logical_axes))
    if len(self.logical_axes) != len(shape):
      raise ValueError(
          f"ParamSpec: logical_axes {self.logical_axes} has {len(self.logical_axes)} names but "
          f"shape {shape} has {len(shape)} dimensions")
    if any(s <= 0 for s in shape):
      raise ValueError(f"ParamSpec: every dimension must be positive, got shape {shape}")

  @property
  def size(self) -> int:
    return math.prod(self.shape)


def is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


# ----------------------------------------------------------------------------- initializers


def normal(std: float) -> Initializer:
  def init(key, shape, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
  return init


def truncated_normal(std: float) -> Initializer:
  def init(key, shape, dtype):
    return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)
  return init


def constant(value: float) -> Initializer:
  def init(key, shape, dtype):
    del key
    return jnp.full(shape, value, dtype)
  return init


zeros = constant(0.0)
ones = constant(1.0)


def xavier_uniform(gain: float = 1.0, fan_in_axes: tuple[int, ...] = (0,)) -> Initializer:
  """Glorot-uniform over a possibly multi-dimensional kernel.

  ``fan_in_axes`` are the input dimensions; the rest are output dimensions (so a kernel
  ``(embed, heads, head_dim)`` has fan_in = embed, fan_out = heads * head_dim).
  """
  def init(key, shape, dtype):
    fan_in = math.prod(shape[a] for a in fan_in_axes)
    fan_out = math.prod(s for i, s in enumerate(shape) if i not in fan_in_axes)
    limit = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(key, shape, jnp.float32, -limit, limit).astype(dtype)
  return init


# ----------------------------------------------------------------------------- tree helpers


def tree_paths(specs) -> list[str]:
  leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
  return [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves]


def count(specs) -> int:
  """Number of scalar parameters described by a spec tree."""
  return sum(s.size for s in jax.tree.leaves(specs, is_leaf=is_spec))


def stack(specs, n: int, axis_name: str | None = "layers"):
  """Specs for ``n`` independently initialised copies stacked on a new leading axis."""
  if n <= 0:
    raise ValueError(f"stack: n must be positive, got {n}")

  def one(s: ParamSpec) -> ParamSpec:
    base = s.init

    def init(key, shape, dtype):
      keys = jax.random.split(key, shape[0])
      return jax.vmap(lambda k: base(k, shape[1:], dtype))(keys)

    return ParamSpec((n, *s.shape), (axis_name, *s.logical_axes), init, s.dtype)

  return jax.tree.map(one, specs, is_leaf=is_spec)


def _leaf_key(key: jax.Array, path: str) -> jax.Array:
  # A key derived from the leaf's path: adding a weight elsewhere never changes this one.
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def shardings(specs, mesh: jax.sharding.Mesh, rules=None):
  """``NamedSharding`` for every spec under ``mesh`` and the logical-axis ``rules``."""
  from jaxblocks import sharding as shd
  return jax.tree.map(
      lambda s: jax.sharding.NamedSharding(mesh, shd.logical_to_spec(s.logical_axes, rules, mesh, s.shape)),
      specs, is_leaf=is_spec)


def abstract(specs, mesh: jax.sharding.Mesh | None = None, rules=None):
  """``jax.ShapeDtypeStruct`` tree (with shardings when a mesh is given)."""
  if mesh is None:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), specs, is_leaf=is_spec)
  shard = shardings(specs, mesh, rules)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      specs, shard, is_leaf=is_spec)


def init(specs, key: jax.Array, mesh: jax.sharding.Mesh | None = None, rules=None):
  """Initialise every parameter inside one ``jax.jit``.

  With a mesh, ``out_shardings`` come from the specs, so every device only ever holds its own
  shards. Each leaf's random key is derived from the root key and the leaf's path.
  """
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
  treedef = jax.tree.structure(specs, is_leaf=is_spec)
  paths = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves_with_paths]
  leaves = [s for _, s in leaves_with_paths]

  def make(root):
    vals = [s.init(_leaf_key(root, p), s.shape, s.dtype) for p, s in zip(paths, leaves)]
    for p, s, v in zip(paths, leaves, vals):
      if v.shape != s.shape:
        raise ValueError(f"initializer of '{p}' returned shape {v.shape}, expected {s.shape}")
    return jax.tree.unflatten(treedef, [v.astype(s.dtype) for v, s in zip(vals, leaves)])

  out_shardings = None if mesh is None else shardings(specs, mesh, rules)
  return jax.jit(make, out_shardings=out_shardings)(key)


def check_tree(params, specs, where: str = "params") -> None:
  """Raise a clear error when ``params`` does not match ``specs`` in structure, shape or dtype."""
  spec_leaves = dict(zip(tree_paths(specs), jax.tree.leaves(specs, is_leaf=is_spec)))
  flat = jax.tree_util.tree_leaves_with_path(params)
  got = {jax.tree_util.keystr(p, simple=True, separator="/"): v for p, v in flat}
  missing = sorted(set(spec_leaves) - set(got))
  extra = sorted(set(got) - set(spec_leaves))
  if missing or extra:
    raise ValueError(f"{where}: structure mismatch; missing {missing[:8]}, unexpected {extra[:8]}")
  for path, spec in spec_leaves.items():
    shape = tuple(np.shape(got[path]))
    if shape != spec.shape:
      raise ValueError(f"{where}/{path}: expected shape {spec.shape}, got {shape}")


def cast_floating(tree, dtype):
  """Cast floating-point leaves of a tree to ``dtype`` (for mixed-precision compute)."""
  def cast(x):
    if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def flatten_dict(tree: Mapping, sep: str = "/") -> dict[str, Any]:
  out = {}
  for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_spec):
    out[jax.tree_util.keystr(p, simple=True, separator=sep)] = v
  return out
