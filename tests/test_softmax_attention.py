import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxblocks.attention import softmax


def _qkv(b, t, n, k, h, seed=0, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, n, h), dtype)
  kk = jax.random.normal(ks[1], (b, t, k, h), dtype)
  v = jax.random.normal(ks[2], (b, t, k, h), dtype)
  return q, kk, v


def _naive(q, k, v, window=None, seg=None):
  """Loop-free but independent formulation: repeat kv heads, explicit causal mask."""
  b, t, n, h = q.shape
  rep = n // k.shape[2]
  k = jnp.repeat(k, rep, axis=2)
  v = jnp.repeat(v, rep, axis=2)
  s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  m = j <= i
  if window is not None:
    m = m & (i - j < window)
  m = jnp.asarray(m)[None, None]
  if seg is not None:
    m = m & (seg[:, None, :, None] == seg[:, None, None, :])
  s = jnp.where(m, s, -1e30)
  return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v)


@settings(max_examples=10)
@given(t=st.integers(1, 9), heads=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       window=st.sampled_from([None, 1, 3]), impl=st.sampled_from(["xla", "reference"]),
       packed=st.booleans())
def test_attend_matches_naive(t, heads, window, impl, packed):
  n, k = heads
  q, kk, v = _qkv(2, t, n, k, 8)
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  seg = jnp.asarray(np.minimum(np.arange(t) // 3, 2) + 1)[None].repeat(2, 0) if packed else None
  # One compile per example instead of one per primitive of each eager call.
  out = jax.jit(lambda q, k, v, pos, seg: softmax.attend(
      q, k, v, q_positions_bt=pos, k_positions_bs=pos, q_segment_ids=seg, k_segment_ids=seg,
      window=window, impl=impl))(q, kk, v, pos, seg)
  expected = jax.jit(_naive, static_argnums=3)(q, kk, v, window, seg)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_xla_and_reference_gradients_agree():
  q, k, v = _qkv(1, 7, 4, 2, 8, seed=3)
  pos = jnp.broadcast_to(jnp.arange(7), (1, 7))

  def loss(impl, q, k, v):
    o = softmax.attend(q, k, v, q_positions_bt=pos, k_positions_bs=pos, impl=impl)
    return jnp.sum(o * jnp.sin(o))

  g_ref = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(q, k, v)
  g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_ref, g_xla):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_softcap_bounds_logits_and_rejects_xla():
  q, k, v = _qkv(1, 5, 2, 2, 4)
  q = q * 100
  pos = jnp.broadcast_to(jnp.arange(5), (1, 5))
  out = softmax.attend(q, k, v, q_positions_bt=pos, k_positions_bs=pos, softcap=1.0)
  assert np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match="softcap"):
    softmax.attend(q, k, v, q_positions_bt=pos, k_positions_bs=pos, softcap=1.0, impl="xla")


def test_attend_shape_errors():
  q, k, v = _qkv(1, 5, 3, 2, 4)
  pos = jnp.broadcast_to(jnp.arange(5), (1, 5))
  with pytest.raises(ValueError, match="not divisible"):
    softmax.attend(q, k, v, q_positions_bt=pos, k_positions_bs=pos)
