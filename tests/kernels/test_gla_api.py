"""GLA kernel API: TPU/Triton lowering from CPU, impl dispatch, input errors, layer ``impl``."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks.attention import linear_ops
from jaxblocks.errors import ConfigError
from jaxblocks.kernels.gla import api
from tests.helpers import cuda_export_target


def _grad_fn(backend, gate, packed):
  def loss(q, k, v, g, s0, seg):
    o, final = api.chunk_gla(q, k, v, g, initial_state=s0, segment_ids=seg if packed else None,
                             impl="pallas", backend=backend, interpret=False)
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


def _operands(gate, b=2, t=200, h=4, hk=2, kd=128, vd=256, dtype=jnp.bfloat16):
  g = {"key": jax.ShapeDtypeStruct((b, t, hk, kd), jnp.float32),
       "head": jax.ShapeDtypeStruct((b, t, hk), jnp.float32)}.get(gate)
  return (jax.ShapeDtypeStruct((b, t, h, kd), dtype), jax.ShapeDtypeStruct((b, t, hk, kd), dtype),
          jax.ShapeDtypeStruct((b, t, hk, vd), dtype), g,
          jax.ShapeDtypeStruct((b, hk, kd, vd), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32))


@pytest.mark.parametrize("gate,packed", [("key", True), ("head", False), ("none", True)])
def test_tpu_lowering(gate, packed):
  """Pallas → Mosaic lowering of the forward and both backward kernels (GQA, ragged T)."""
  f = _grad_fn("tpu", gate, packed)
  text = jax.jit(f).trace(*_operands(gate)).lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("tpu_custom_call") >= 3


def test_gpu_lowering_to_triton():
  """Pallas → Triton lowering for CUDA (export needs no GPU); Mosaic GPU is not used."""
  with cuda_export_target():
    exported = jax.export.export(
        jax.jit(_grad_fn("gpu", "key", True)), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*_operands("key", kd=96, vd=200))
  text = exported.mlir_module()
  assert text.count("__gpu$xla.gpu.triton") >= 3
  assert "mosaic_gpu" not in text


def _small():
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (1, 8, 2, 8))
  k = jax.random.normal(ks[1], (1, 8, 2, 8))
  v = jax.random.normal(ks[2], (1, 8, 2, 8))
  return q, k, v, jax.nn.log_sigmoid(jax.random.normal(ks[3], (1, 8, 2, 8)))


def test_auto_on_cpu_is_the_xla_reference():
  q, k, v, g = _small()
  got = jax.jit(api.chunk_gla)(q, k, v, g)
  want = jax.jit(linear_ops.chunk_gla)(q, k, v, g)
  jaxpr = str(jax.make_jaxpr(lambda *a: api.chunk_gla(*a))(q, k, v, g))
  assert "pallas_call" not in jaxpr
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b)


def test_errors_name_the_problem():
  q, k, v, g = _small()
  with pytest.raises(ValueError, match="impl"):
    api.chunk_gla(q, k, v, g, impl="fast")
  with pytest.raises(ValueError, match="backend"):
    api.chunk_gla(q, k, v, g, impl="pallas", backend="cuda")
  with pytest.raises(ValueError, match="sub_chunk"):
    api.chunk_gla(q, k, v, g, chunk_size=24, sub_chunk=16)
  with pytest.raises(ValueError, match="log_g"):
    api.chunk_gla(q, k, v, g[..., :3])
  with pytest.raises(ValueError, match="Triton"):
    api.chunk_gla(q, k, v, g, impl="pallas", backend="gpu", chunk_size=48, sub_chunk=16)
  with pytest.raises(ValueError, match="dtype"):
    api.chunk_gla(q.astype(jnp.float16), k, v, g, impl="pallas")


def test_layer_impl_switch():
  """``attention.gla.impl='pallas'`` runs the kernel inside the model and matches ``xla``."""
  att = jb.AttentionConfig(n_heads=2)

  def config(impl):
    a = dataclasses.replace(att, gla=dataclasses.replace(att.gla, impl=impl, chunk_size=16,
                                                         sub_chunk=8))
    return jb.ModelConfig(vocab_size=31, d_model=32, n_layers=1, max_seq_len=32,
                          attention_pattern=("gla",), attention=a).validate()

  cfg_x, cfg_p = config("xla"), config("pallas")
  params = jb.model.init(cfg_x, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (1, 20), 0, 31)
  fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
  run = lambda cfg: jax.jit(lambda p, t: jb.model.apply(p, t, cfg)).trace(
      params, toks).lower().compile(fast)(params, toks)
  np.testing.assert_allclose(run(cfg_p), run(cfg_x), rtol=2e-4, atol=2e-4)
  with pytest.raises(ConfigError, match="impl"):
    config("triton")
