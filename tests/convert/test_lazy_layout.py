"""Lazy layout expressions: a slice read equals slicing the full read, and write inverts read."""

import numpy as np
from hypothesis import given, strategies as st

from jaxblocks.convert.lazy import Stack, Tensor, full_index, normalize_index


class DictSource:
  def __init__(self, arrays):
    self.arrays, self.reads = arrays, []

  def read_slice(self, name, index):
    self.reads.append((name, index))
    return self.arrays[name][index]


class DictSink:
  def __init__(self):
    self.arrays = {}

  def write_slice(self, name, shape, index, value):
    self.arrays.setdefault(name, np.full(shape, np.nan, np.float32))[index] = value


def _exprs(n_layers, d, n, h):
  """NeoX-style fused QKV [(n·3h), d] per layer → stacked [layers, d, n, h] for q, k and v."""
  def layer_part(l, i):
    fused = Tensor(f"l{l}.qkv", (n * 3 * h, d)).T().split(1, (n, 3 * h))
    return fused.slice(2, i * h, (i + 1) * h)
  return [Stack([layer_part(l, i) for l in range(n_layers)]) for i in range(3)]


def _reference(arrays, n_layers, d, n, h, i):
  return np.stack([arrays[f"l{l}.qkv"].T.reshape(d, n, 3 * h)[:, :, i * h:(i + 1) * h]
                   for l in range(n_layers)])


@st.composite
def _case(draw):
  n_layers, d, n, h = (draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 3)),
                       draw(st.integers(1, 4)))
  shape = (n_layers, d, n, h)
  index = []
  for size in shape:
    a = draw(st.integers(0, size - 1))
    index.append(slice(a, draw(st.integers(a + 1, size))))
  return n_layers, d, n, h, tuple(index), draw(st.integers(0, 2))


@given(_case())
def test_slice_read_matches_full_layout(case):
  n_layers, d, n, h, index, part = case
  rng = np.random.default_rng(0)
  arrays = {f"l{l}.qkv": rng.normal(size=(n * 3 * h, d)).astype(np.float32)
            for l in range(n_layers)}
  src = DictSource(arrays)
  expr = _exprs(n_layers, d, n, h)[part]
  want = _reference(arrays, n_layers, d, n, h, part)
  np.testing.assert_array_equal(expr.read(src), want)
  src.reads.clear()
  np.testing.assert_array_equal(expr.read(src, index), want[index])
  # only the requested layers are read, and only the requested input rows (d axis)
  assert {name for name, _ in src.reads} == {f"l{l}.qkv" for l in range(index[0].start,
                                                                        index[0].stop)}
  assert all(ix[1] == index[1] for _, ix in src.reads)


@given(_case())
def test_write_inverts_read(case):
  n_layers, d, n, h, index, _ = case
  rng = np.random.default_rng(1)
  arrays = {f"l{l}.qkv": rng.normal(size=(n * 3 * h, d)).astype(np.float32)
            for l in range(n_layers)}
  src, sink = DictSource(arrays), DictSink()
  for expr in _exprs(n_layers, d, n, h):  # q, k, v together cover every fused tensor
    expr.write(sink, expr.read(src))
  for name, a in arrays.items():
    np.testing.assert_array_equal(sink.arrays[name], a)
  # a partial write touches exactly its region
  expr = _exprs(n_layers, d, n, h)[0]
  part_sink = DictSink()
  expr.write(part_sink, expr.read(src, index), index)
  got = np.stack([part_sink.arrays.get(f"l{l}.qkv", np.full((n * 3 * h, d), np.nan, np.float32))
                  for l in range(n_layers)])
  got = np.stack([got[l].T.reshape(d, n, 3 * h)[:, :, :h] for l in range(n_layers)])
  np.testing.assert_array_equal(got[index], _reference(arrays, n_layers, d, n, h, 0)[index])
  assert np.isnan(got).sum() == got.size - got[index].size


def test_normalize_index():
  assert normalize_index((slice(None), slice(1, None)), (3, 4)) == (slice(0, 3), slice(1, 4))
  assert normalize_index((), (2,)) == full_index((2,))
