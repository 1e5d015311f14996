"""Fused norm API: dispatch, validation, XLA fallback, and the NormConfig.impl switch."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks import norms
from jaxblocks.errors import ConfigError
from jaxblocks.kernels import common
from jaxblocks.kernels.norm import api, reference


def _x(shape=(3, 5, 64), dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


def test_auto_on_cpu_is_the_reference():
  x, r = _x(), _x(seed=1)
  w = jnp.linspace(0.5, 1.5, 64)
  got = api.fused_add_norm(x, r, w, kind="layer", eps=1e-5)
  want = reference.fused_add_norm(x, r, w, kind="layer", eps=1e-5)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_plain_norm_pallas_matches_xla_and_keeps_dtype():
  x = _x(dtype=jnp.bfloat16)
  w = jnp.linspace(0.5, 1.5, 64)
  y = api.norm(x, w, kind="rms", impl="pallas")
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(api.norm(x, w, kind="rms", impl="xla"), np.float32),
                             atol=2e-2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="batch"), "kind must be one of"),
    (dict(impl="triton"), "impl must be one of"),
    (dict(backend="cpu", impl="pallas"), "backend must be one of"),
    (dict(eps=-1.0), "eps must be a non-negative"),
    (dict(residual=jnp.zeros((3, 5, 32))), "residual shape"),
    (dict(gate=jnp.zeros((3, 64))), "gate shape"),
    (dict(weight=jnp.ones((32,))), r"weight shape \(32,\) must be \(64,\)"),
    (dict(bias=jnp.ones((1, 64))), "bias shape"),
    (dict(x=jnp.ones((3, 64), jnp.int32)), "x must be floating point"),
    (dict(residual_dtype=jnp.int8), "residual_dtype must be floating point"),
])
def test_bad_input_raises_a_clear_error(kwargs, match):
  args = dict(x=_x(), residual=None, weight=None, bias=None)
  args.update(kwargs)
  x, residual, weight, bias = (args.pop(k) for k in ("x", "residual", "weight", "bias"))
  with pytest.raises(ValueError, match=match):
    api.fused_add_norm(x, residual, weight, bias, **args)


def test_unsupported_dtype_falls_back_once_under_auto_and_raises_under_pallas(monkeypatch, caplog):
  monkeypatch.setattr(common, "placement_backend", lambda mesh=None: "tpu")
  monkeypatch.setattr(common, "_warned", set())
  x, r = _x(dtype=jnp.float16), _x(dtype=jnp.float16, seed=1)
  with caplog.at_level(logging.WARNING, logger="jaxblocks.kernels"):
    for _ in range(2):
      y, new_res = api.fused_add_norm(x, r, impl="auto", interpret=True)
  fallback_logs = [rec for rec in caplog.records if "using the XLA path" in rec.getMessage()]
  assert len(fallback_logs) == 1 and "float16" in fallback_logs[0].getMessage()
  want = reference.fused_add_norm(x, r)
  np.testing.assert_array_equal(y, want[0])
  np.testing.assert_array_equal(new_res, want[1])
  with pytest.raises(ValueError, match="no tpu kernel for dtype"):
    api.fused_add_norm(x, r, impl="pallas")


def test_too_wide_rows_fall_back_on_gpu(monkeypatch):
  monkeypatch.setattr(common, "_warned", set())
  x = jnp.ones((2, 2 * api.gpu_kernels.MAX_BLOCK_COLS), jnp.float32)
  with pytest.raises(ValueError, match="no gpu kernel for width"):
    api.norm(x, impl="pallas", backend="gpu")


def test_norm_config_impl_is_validated():
  norms.NormConfig(impl="pallas").validate()
  with pytest.raises(ConfigError, match="norm.impl"):
    norms.NormConfig(impl="fast").validate()


@pytest.mark.parametrize("cfg", [
    norms.NormConfig(kind="rmsnorm", scale_offset=1.0, impl="pallas"),
    norms.NormConfig(kind="layernorm", bias=True, eps=1e-5, impl="pallas"),
])
def test_norm_layers_route_through_the_kernel(cfg):
  """``norms.apply`` with ``impl='pallas'`` equals the XLA layer, values and gradients."""
  from jaxblocks import params as P
  specs = norms.specs(64, cfg)
  params = jax.tree.map(lambda s: s.init(jax.random.PRNGKey(2), s.shape, jnp.float32) + 0.1,
                        specs, is_leaf=lambda s: isinstance(s, P.ParamSpec))
  x = _x((2, 7, 64))
  xla_cfg = norms.NormConfig(**{**cfg.__dict__, "impl": "xla"})

  def loss(params, x, cfg):
    return jnp.sum(jnp.sin(norms.apply(params, x, cfg)))

  got = jax.grad(loss, argnums=(0, 1))(params, x, cfg)
  want = jax.grad(loss, argnums=(0, 1))(params, x, xla_cfg)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda p, x: norms.apply(p, x, cfg))(params, x))
  assert "pallas_call" in jaxpr
