"""Lazy views of checkpoint tensors: the one description of how a jaxblocks parameter is laid out
in a Hugging Face checkpoint, used in both directions.

An expression is built from :class:`Tensor` leaves (a named tensor of a safetensors checkpoint)
and layout operations (transpose, split an axis in two, slice, pick, stack per layer). Import calls :meth:`Expr.read` with the index of one device's shard, which reads only
that part of the file (``safe_open(...).get_slice``); export calls :meth:`Expr.write` with the
full parameter, which scatters it back into the checkpoint tensors it came from.

Indices are tuples of ``slice`` objects with explicit start/stop and step 1, one per axis.
"""

from __future__ import annotations

import abc

from typing import Callable, Protocol, Sequence

import numpy as np

Index = tuple[slice, ...]


class TensorSource(Protocol):
  def read_slice(self, name: str, index: Index) -> np.ndarray: ...


class Sink(Protocol):
  def write_slice(self, name: str, shape: tuple[int, ...], index: Index,
                  value: np.ndarray) -> None: ...


def full_index(shape: Sequence[int]) -> Index:
  return tuple(slice(0, n) for n in shape)


def normalize_index(index, shape: Sequence[int]) -> Index:
  """Turn a jax shard index (slices with None bounds) into explicit ``slice(start, stop)``s."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
  out = []
  for s, n in zip(index, shape):
    start, stop, step = s.indices(n)
    if step != 1:
      raise ValueError(f"strided shard index {s} is not supported")
    out.append(slice(start, stop))
  return tuple(out)


def _extent(s: slice) -> int:
  return s.stop - s.start


class Expr(abc.ABC):
  """A lazily read array of ``shape`` (abstract: every node type implements read/write/leaves)."""

  shape: tuple[int, ...]

  @abc.abstractmethod
  def read(self, source: TensorSource, index: Index | None = None) -> np.ndarray:
    ...

  @abc.abstractmethod
  def write(self, sink: Sink, value: np.ndarray, index: Index | None = None) -> None:
    ...

  @abc.abstractmethod
  def leaves(self) -> list["Tensor"]:
    ...

  # -- building
  def T(self, *perm: int) -> "Expr":  # noqa: N802 (numpy-like)
    return Transpose(self, perm or tuple(reversed(range(len(self.shape)))))

  def split(self, axis: int, sizes: tuple[int, int]) -> "Expr":
    return SplitAxis(self, axis, sizes)

  def slice(self, axis: int, start: int, stop: int) -> "Expr":
    return Slice(self, axis, start, stop)

  def pick(self, axis: int, i: int) -> "Expr":
    return Pick(self, axis, i)


class Tensor(Expr):
  """A tensor of the checkpoint, by name."""

  def __init__(self, name: str, shape: Sequence[int]):
    self.name, self.shape = name, tuple(int(n) for n in shape)

  def read(self, source, index=None):
    return source.read_slice(self.name, index or full_index(self.shape))

  def write(self, sink, value, index=None):
    sink.write_slice(self.name, self.shape, index or full_index(self.shape), value)

  def leaves(self):
    return [self]

  def __repr__(self):
    return f"Tensor({self.name!r}, {self.shape})"


class Transpose(Expr):
  def __init__(self, parent: Expr, perm: Sequence[int]):
    self.parent, self.perm = parent, tuple(perm)
    self.inverse = tuple(int(i) for i in np.argsort(self.perm))
    self.shape = tuple(parent.shape[p] for p in self.perm)

  def read(self, source, index=None):
    index = index or full_index(self.shape)
    parent_index = tuple(index[self.inverse[a]] for a in range(len(self.perm)))
    return np.transpose(self.parent.read(source, parent_index), self.perm)

  def write(self, sink, value, index=None):
    index = index or full_index(self.shape)
    parent_index = tuple(index[self.inverse[a]] for a in range(len(self.perm)))
    self.parent.write(sink, np.transpose(value, self.inverse), parent_index)

  def leaves(self):
    return self.parent.leaves()


class SplitAxis(Expr):
  """View axis ``axis`` of size ``a·b`` as two axes ``(a, b)`` (row-major)."""

  def __init__(self, parent: Expr, axis: int, sizes: tuple[int, int]):
    a, b = sizes
    if parent.shape[axis] != a * b:
      raise ValueError(f"cannot split axis {axis} of {parent.shape} into {sizes}")
    self.parent, self.axis, self.sizes = parent, axis, (a, b)
    self.shape = parent.shape[:axis] + (a, b) + parent.shape[axis + 1:]

  def _parent_index(self, index, outer: slice) -> Index:
    b = self.sizes[1]
    return index[:self.axis] + (slice(outer.start * b, outer.stop * b),) + index[self.axis + 2:]

  def read(self, source, index=None):
    index = index or full_index(self.shape)
    outer, inner = index[self.axis], index[self.axis + 1]
    x = self.parent.read(source, self._parent_index(index, outer))
    x = x.reshape(x.shape[:self.axis] + (_extent(outer), self.sizes[1]) + x.shape[self.axis + 1:])
    take = [slice(None)] * x.ndim
    take[self.axis + 1] = inner
    return x[tuple(take)]

  def write(self, sink, value, index=None):
    index = index or full_index(self.shape)
    outer, inner = index[self.axis], index[self.axis + 1]
    b = self.sizes[1]
    if _extent(inner) == b:
      v = value.reshape(value.shape[:self.axis] + (-1,) + value.shape[self.axis + 2:])
      self.parent.write(sink, v, self._parent_index(index, outer))
      return
    for j, row in enumerate(range(outer.start, outer.stop)):  # a partial inner range per row
      v = np.take(value, j, axis=self.axis)
      part = slice(row * b + inner.start, row * b + inner.stop)
      self.parent.write(sink, v, index[:self.axis] + (part,) + index[self.axis + 2:])

  def leaves(self):
    return self.parent.leaves()


class Slice(Expr):
  """``parent[..., start:stop, ...]`` along ``axis`` (a part of a fused tensor)."""

  def __init__(self, parent: Expr, axis: int, start: int, stop: int):
    if not 0 <= start < stop <= parent.shape[axis]:
      raise ValueError(f"slice {start}:{stop} out of range for axis {axis} of {parent.shape}")
    self.parent, self.axis, self.start, self.stop = parent, axis, start, stop
    self.shape = parent.shape[:axis] + (stop - start,) + parent.shape[axis + 1:]

  def _parent_index(self, index):
    s = index[self.axis]
    return index[:self.axis] + (slice(self.start + s.start, self.start + s.stop),) + \
        index[self.axis + 1:]

  def read(self, source, index=None):
    return self.parent.read(source, self._parent_index(index or full_index(self.shape)))

  def write(self, sink, value, index=None):
    self.parent.write(sink, value, self._parent_index(index or full_index(self.shape)))

  def leaves(self):
    return self.parent.leaves()


class Pick(Expr):
  """``parent`` at position ``i`` of ``axis`` (the axis disappears)."""

  def __init__(self, parent: Expr, axis: int, i: int):
    self.parent, self.axis, self.i = parent, axis, i
    self.shape = parent.shape[:axis] + parent.shape[axis + 1:]

  def _parent_index(self, index):
    return index[:self.axis] + (slice(self.i, self.i + 1),) + index[self.axis:]

  def read(self, source, index=None):
    x = self.parent.read(source, self._parent_index(index or full_index(self.shape)))
    return np.squeeze(x, self.axis)

  def write(self, sink, value, index=None):
    self.parent.write(sink, np.expand_dims(value, self.axis),
                      self._parent_index(index or full_index(self.shape)))

  def leaves(self):
    return self.parent.leaves()


class Stack(Expr):
  """A new leading axis over per-layer expressions of equal shape (jaxblocks' stacked layers)."""

  def __init__(self, parts: Sequence[Expr]):
    parts = list(parts)
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
      raise ValueError(f"cannot stack expressions of different shapes {sorted(shapes)}")
    self.parts, self.shape = parts, (len(parts),) + parts[0].shape

  def read(self, source, index=None):
    index = index or full_index(self.shape)
    rows = [self.parts[i].read(source, index[1:]) for i in range(index[0].start, index[0].stop)]
    return np.stack(rows)

  def write(self, sink, value, index=None):
    index = index or full_index(self.shape)
    for j, i in enumerate(range(index[0].start, index[0].stop)):
      self.parts[i].write(sink, value[j], index[1:])

  def leaves(self):
    return [leaf for p in self.parts for leaf in p.leaves()]


def stack_layers(n_layers: int, period: int, position: int,
                 layer_expr: Callable[[int], Expr]) -> Expr:
  """The stacked expression of pattern position ``position``: layers ``position, position +
  period, ...`` (jaxblocks stores layer ``l`` at ``layers[l % period][l // period]``)."""
  return Stack([layer_expr(l) for l in range(position, n_layers, period)])

