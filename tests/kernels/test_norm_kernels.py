"""Fused norm kernels (interpret mode) against the XLA reference: values and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from jaxblocks.kernels.norm import api, reference

# The interpreted kernels are large programs; XLA's backend optimisations only slow their compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _tolerance(dtype):
  return 2e-2 if dtype == jnp.bfloat16 else 2e-5


def _assert_close(name, got, want, dtype):
  got = np.asarray(jnp.asarray(got, jnp.float32))
  want = np.asarray(jnp.asarray(want, jnp.float32))
  assert got.shape == want.shape, (name, got.shape, want.shape)
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= _tolerance(dtype) * scale, f"{name}: max error {err} (scale {scale})"


def _case(seed, shape, dtype, kind, has_residual, has_weight, has_bias, has_gate, residual_dtype):
  keys = jax.random.split(jax.random.PRNGKey(seed), 8)
  d = shape[-1]
  x = (2.0 * jax.random.normal(keys[0], shape) + 0.5).astype(dtype)
  args = dict(
      x=x,
      residual=jax.random.normal(keys[1], shape).astype(dtype) if has_residual else None,
      weight=(1.0 + 0.2 * jax.random.normal(keys[2], (d,))) if has_weight else None,
      bias=0.2 * jax.random.normal(keys[3], (d,)) if has_bias else None,
      gate=jax.random.normal(keys[4], shape).astype(dtype) if has_gate else None)
  out_dtype = residual_dtype or dtype
  cotangents = (jax.random.normal(keys[5], shape).astype(dtype),
                jax.random.normal(keys[6], shape).astype(out_dtype))
  return args, cotangents


def check_against_reference(backend, interpret, seed, shape, dtype, kind, has_residual,
                            has_weight, has_bias, has_gate, residual_dtype, block_rows=None,
                            scale_offset=0.0):
  """Forward outputs and the VJP w.r.t. every operand match the reference."""
  args, (dy, dr) = _case(seed, shape, dtype, kind, has_residual, has_weight, has_bias, has_gate,
                         residual_dtype)
  names = [k for k, v in args.items() if v is not None]

  def make(impl):
    def f(*ops):
      kw = dict(zip(names, ops))
      common = dict(kind=kind, eps=1e-5, scale_offset=scale_offset, gate=kw.get("gate"))
      if impl == "xla":
        return reference.fused_add_norm(kw["x"], kw.get("residual"), kw.get("weight"),
                                        kw.get("bias"), residual_dtype=residual_dtype, **common)
      return api.fused_add_norm(kw["x"], kw.get("residual"), kw.get("weight"), kw.get("bias"),
                                residual_dtype=residual_dtype, impl="pallas", backend=backend,
                                interpret=interpret, block_rows=block_rows, **common)

    def run(*ops):
      out, vjp = jax.vjp(f, *ops)
      return out, vjp((dy, dr))

    return jax.jit(run).trace(*ops).lower().compile(FAST_COMPILE)

  ops = [args[k] for k in names]
  (y, new_res), grads = make("pallas")(*ops)
  (y_ref, new_res_ref), grads_ref = make("xla")(*ops)
  assert y.dtype == y_ref.dtype == dtype
  assert new_res.dtype == new_res_ref.dtype
  _assert_close("y", y, y_ref, dtype)
  _assert_close("new_residual", new_res, new_res_ref, new_res_ref.dtype)
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert g.dtype == g_ref.dtype, (name, g.dtype, g_ref.dtype)
    _assert_close(f"d{name}", g, g_ref, dtype)


# Every example compiles two interpreted kernels: report the falsifying example without shrinking.
_PHASES = (Phase.explicit, Phase.generate)

cases = st.fixed_dictionaries(dict(
    seed=st.integers(0, 2**16),
    shape=st.sampled_from([(37, 200), (5, 3, 96), (64, 256), (9, 130), (1, 128), (70, 72)]),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    kind=st.sampled_from(["rms", "layer"]),
    has_residual=st.booleans(), has_weight=st.booleans(), has_bias=st.booleans(),
    has_gate=st.booleans(),
    residual_dtype=st.sampled_from([None, jnp.float32])))


@settings(max_examples=5, deadline=None, database=None, phases=_PHASES)
@given(case=cases, block_rows=st.sampled_from([None, 8, 16]))
def test_tpu_kernel_matches_reference(case, block_rows):
  """Mosaic kernel under the TPU interpreter with race detection (partial last row blocks)."""
  check_against_reference("tpu", pltpu.InterpretParams(detect_races=True),
                          block_rows=block_rows, **case)


@settings(max_examples=4, deadline=None, database=None, phases=_PHASES)
@given(case=cases, block_rows=st.sampled_from([None, 2, 4]))
def test_gpu_kernel_matches_reference(case, block_rows):
  """Triton kernel in interpret mode: masked power-of-2 tiles over odd rows and widths."""
  check_against_reference("gpu", True, block_rows=block_rows, **case)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_full_featured_case_with_scale_offset(backend):
  """Residual + weight (Gemma offset) + bias + gate + float32 stream from bfloat16 inputs."""
  check_against_reference(backend, True, seed=3, shape=(2, 19, 160), dtype=jnp.bfloat16,
                          kind="layer", has_residual=True, has_weight=True, has_bias=True,
                          has_gate=True, residual_dtype=jnp.float32, scale_offset=1.0,
                          block_rows=8 if backend == "tpu" else 4)
