"""Chunked GLA kernels (Pallas interpret mode) against the recurrent reference: outputs, final
state and the gradients w.r.t. q, k, v, gates and the initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.attention import linear_ops
from jaxblocks.kernels.gla import api

# The interpreted kernels are large programs; XLA's backend optimisations only slow their compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _tolerance(dtype):
  return 3e-2 if dtype == jnp.bfloat16 else 1e-4


def _assert_close(name, got, want, dtype):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, (name, got.shape, want.shape)
  assert np.all(np.isfinite(got)), f"{name}: non-finite values"
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= _tolerance(dtype) * scale, f"{name}: max error {err} (scale {scale})"


def make_case(seed, batch, time, heads, kv_heads, key_dim, value_dim, gate, decay, dtype,
              packed, with_state=True):
  """Inputs, segment ids and output cotangents. ``decay``: ``normal`` (gates around
  logsigmoid(2)), ``strong`` (log-gates near -30, states wiped every token) or ``none``."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(keys[0], (batch, time, heads, key_dim)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, time, kv_heads, key_dim)).astype(dtype)
  v = jax.random.normal(keys[2], (batch, time, kv_heads, value_dim)).astype(dtype)
  gate_shape = {"key": (batch, time, kv_heads, key_dim), "head": (batch, time, kv_heads),
                "none": None}[gate]
  log_g = None
  if gate_shape is not None:
    x = jax.random.normal(keys[3], gate_shape)
    if decay == "strong":
      log_g = -30.0 + x
    elif decay == "none":
      log_g = jnp.zeros(gate_shape)
    else:
      log_g = jax.nn.log_sigmoid(x + 2.0)
  s0 = jax.random.normal(keys[4], (batch, kv_heads, key_dim, value_dim)) if with_state else None
  seg = None
  if packed:
    cuts = jax.random.randint(keys[5], (batch, time), 0, 5) == 0
    seg = jnp.cumsum(cuts.astype(jnp.int32), axis=1)
  do = jax.random.normal(keys[6], (batch, time, heads, value_dim)).astype(dtype)
  dfinal = jax.random.normal(keys[7], (batch, kv_heads, key_dim, value_dim))
  return (q, k, v, log_g, s0), seg, (do, dfinal)


def check_against_recurrent(args, seg, cotangents, dtype, **kernel_kw):
  names = ("q", "k", "v", "log_g", "initial_state")
  present = [i for i, a in enumerate(args) if a is not None]

  def make(fn):
    def run(*ops):
      full = list(args)
      for i, op in zip(present, ops):
        full[i] = op
      f = lambda *o: fn(*[dict(zip(present, o)).get(i) for i in range(5)])
      out, vjp = jax.vjp(f, *ops)
      return out, vjp(cotangents)
    ops = [args[i] for i in present]
    return jax.jit(run).trace(*ops).lower().compile(FAST_COMPILE)(*ops)

  (o, final), grads = make(lambda q, k, v, g, s0: api.chunk_gla(
      q, k, v, g, initial_state=s0, segment_ids=seg, impl="pallas", **kernel_kw))
  (o_ref, final_ref), grads_ref = make(lambda q, k, v, g, s0: linear_ops.recurrent_gla(
      q, k, v, g, initial_state=s0, segment_ids=seg))
  assert o.dtype == o_ref.dtype == dtype and final.dtype == jnp.float32
  _assert_close("o", o, o_ref, dtype)
  _assert_close("final_state", final, final_ref, dtype)
  for i, g, g_ref in zip(present, grads, grads_ref):
    assert g.dtype == g_ref.dtype, (names[i], g.dtype, g_ref.dtype)
    _assert_close(f"d{names[i]}", g, g_ref, dtype)


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**16), time=st.integers(1, 40), chunk=st.sampled_from([16, 32]),
       gqa=st.booleans(), gate=st.sampled_from(["key", "head", "none"]),
       decay=st.sampled_from(["normal", "strong", "none"]), packed=st.booleans(),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_tpu_kernel_interpret_matches_recurrent(seed, time, chunk, gqa, gate, decay, packed,
                                                dtype):
  """TPU kernel (interpret mode): chunk sizes, ragged lengths, GQA, gate layouts, strong and no
  decay, packed documents, bfloat16/float32 — values and every gradient."""
  args, seg, cot = make_case(seed, 2, time, 4 if gqa else 2, 2, 16, 32, gate, decay, dtype,
                             packed)
  check_against_recurrent(args, seg, cot, dtype, chunk_size=chunk, sub_chunk=16, backend="tpu",
                          interpret=True)


def test_tpu_kernel_race_detection():
  """TPU interpret mode simulating memory spaces with race detection and shuffled parallel grid
  order: value tiles (block_v < V), GQA, per-key-dim gates, packed documents."""
  params = pltpu.InterpretParams(detect_races=True, random_seed=3)
  args, seg, cot = make_case(0, 1, 20, 2, 1, 8, 256, "key", "normal", jnp.float32, True)
  check_against_recurrent(args, seg, cot, jnp.float32, chunk_size=16, sub_chunk=8,
                          backend="tpu", interpret=params, block_v=128)


def test_gpu_kernel_interpret_matches_recurrent():
  """Triton kernel (interpret mode): odd head dims padded to powers of two, value tiles, GQA,
  packed documents, two sub-chunks per chunk."""
  args, seg, cot = make_case(1, 1, 37, 2, 1, 12, 20, "key", "normal", jnp.float32, True)
  check_against_recurrent(args, seg, cot, jnp.float32, chunk_size=32, sub_chunk=16,
                          backend="gpu", interpret=True, block_v=16)


def test_no_initial_state_and_cu_seqlens():
  """``initial_state=None`` (zeros, no gradient) and ``cu_seqlens`` packing."""
  args, _, cot = make_case(2, 1, 24, 2, 2, 16, 16, "key", "normal", jnp.float32, False,
                           with_state=False)
  q, k, v, g, _ = args
  cu = jnp.array([0, 5, 17, 24])
  got = jax.jit(lambda *a: api.chunk_gla(*a, cu_seqlens=cu, impl="pallas", chunk_size=16,
                                         sub_chunk=8)).trace(q, k, v, g).lower().compile(
                                             FAST_COMPILE)(q, k, v, g)
  want = linear_ops.recurrent_gla(q, k, v, g, cu_seqlens=cu)
  for a, b, n in zip(got, want, ("o", "final")):
    _assert_close(n, a, b, jnp.float32)
