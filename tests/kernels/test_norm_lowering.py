"""The fused norm kernels lower for real accelerators from a CPU-only machine."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks.kernels.norm import api
from tests.helpers import cuda_export_target

CASES = [("rms", jnp.bfloat16, 1000, False, False), ("layer", jnp.float32, 200, True, True)]


def _value_and_grads(kind, gate, bias, backend, **kw):
  def loss(x, r, w, b, g):
    y, new_res = api.fused_add_norm(x, r, w, b if bias else None, gate=g if gate else None,
                                    kind=kind, residual_dtype=jnp.float32, impl="pallas",
                                    backend=backend, interpret=False, **kw)
    return jnp.sum(y.astype(jnp.float32)) + jnp.sum(new_res)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


def _operands(dtype, d, rows=37):
  x = jax.ShapeDtypeStruct((rows, d), dtype)
  w = jax.ShapeDtypeStruct((d,), jnp.float32)
  return x, x, w, w, x


@pytest.mark.parametrize("kind,dtype,d,gate,bias", CASES)
def test_tpu_lowering(kind, dtype, d, gate, bias):
  """Pallas → Mosaic lowering of forward and backward (partial last row block, odd width)."""
  f = _value_and_grads(kind, gate, bias, "tpu", block_rows=32)
  text = jax.jit(f).trace(*_operands(dtype, d)).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") >= 2  # forward and backward kernels


@pytest.mark.parametrize("kind,dtype,d,gate,bias", CASES)
def test_gpu_lowering_to_triton(kind, dtype, d, gate, bias):
  """Pallas → Triton lowering for CUDA (export needs no GPU); Mosaic GPU is not used."""
  f = _value_and_grads(kind, gate, bias, "gpu")
  with cuda_export_target():
    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*_operands(dtype, d))
  text = exported.mlir_module()
  assert text.count("__gpu$xla.gpu.triton") >= 2
  assert "mosaic_gpu" not in text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_tpu_compiles_for_a_real_topology():
  """With libtpu, the sharded kernels compile with the real Mosaic compiler for a v5e slice."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from jaxblocks import sharding as S

  topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  mesh = Mesh(np.array(topology.devices).reshape(2, 2), ("data", "fsdp"))
  rules = S.Rules({"batch": ("data", "fsdp")})
  for kind, dtype, d, gate, bias in CASES:
    x = jax.ShapeDtypeStruct((8, 37, d), dtype, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
    w = jax.ShapeDtypeStruct((d,), jnp.float32, sharding=NamedSharding(mesh, P()))
    f = _value_and_grads(kind, gate, bias, "tpu", block_rows=32, mesh=mesh, rules=rules)
    jax.jit(f).lower(x, x, w, w, x).compile()
