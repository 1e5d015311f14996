"""Every norm kind against a NumPy reference, its inits, options and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxblocks import norms
from jaxblocks import params as P
from jaxblocks.errors import ConfigError
from jaxblocks.norms import NormConfig, NormContext

D = 16


def _init(cfg, role="mlp", d=D, seed=0):
  p = P.init(norms.specs(d, cfg, role), jax.random.key(seed))
  # Move every weight off its init so the formulas are really exercised.
  leaves, tdef = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), max(len(leaves), 1))
  return jax.tree.unflatten(tdef, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in
                                   zip(leaves, keys)])


def _rms(x, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _reference(kind, p, x, cfg):
  p = jax.tree.map(np.asarray, p)
  x = np.asarray(x, np.float64)
  gain = lambda: cfg.scale_offset + p["scale"]  # noqa: E731
  if kind == "layernorm":
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + cfg.eps) * gain() + p["bias"]
  if kind == "rmsnorm":
    return _rms(x, cfg.eps) * gain() + p["bias"]
  if kind == "crmsnorm":
    full = np.concatenate([x, -x.sum(-1, keepdims=True)], -1)
    return (_rms(full, cfg.eps)[..., :-1]) * gain() + p["bias"]
  if kind == "dyt":
    return np.tanh(p["alpha"] * x) * gain() + p["bias"]
  if kind == "bhyt":
    return np.tanh(p["lambda"] * _rms(x, cfg.eps) / cfg.bhyt_kappa) * gain() + p["bias"]
  if kind == "seednorm":
    return (np.tanh(x @ p["beta"])[..., None] * p["alpha"] + gain()) * _rms(x, cfg.eps) + p["bias"]
  if kind == "single_scale_rmsnorm":
    return _rms(x, cfg.eps) * gain()
  if kind == "none":
    return x
  raise AssertionError(kind)


STATELESS = ["layernorm", "rmsnorm", "crmsnorm", "dyt", "bhyt", "seednorm",
             "single_scale_rmsnorm", "none"]


@pytest.mark.parametrize("kind", STATELESS)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_matches_reference(kind, offset):
  bias = norms.NORMS[kind].supports_bias and kind != "single_scale_rmsnorm"
  cfg = NormConfig(kind=kind, eps=1e-5, bias=bias, scale_offset=offset)
  cfg.validate()
  p = _init(cfg)
  x = 3.0 * jax.random.normal(jax.random.key(7), (2, 5, D))
  y = norms.apply(p, x, cfg)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, _reference(kind, p, x, cfg), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kind", STATELESS)
def test_bfloat16_input_float32_statistics(kind):
  cfg = NormConfig(kind=kind)
  p = _init(cfg)
  x = (100.0 * jax.random.normal(jax.random.key(3), (4, D))).astype(jnp.bfloat16)
  y = norms.apply(p, x, cfg)
  assert y.dtype == jnp.bfloat16
  ref = norms.apply(p, x.astype(jnp.float32), cfg)
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 24), st.floats(-3, 3), st.floats(0.01, 50))
def test_crmsnorm_equals_rmsnorm_of_zero_mean_vector(d, shift, spread):
  x = spread * np.random.default_rng(d).standard_normal((3, d))
  x = x - x.mean(-1, keepdims=True)
  full = norms.rms_normalize(jnp.asarray(x), 1e-6)
  comp = norms.crms_normalize(jnp.asarray(x[:, :-1]), 1e-6)
  np.testing.assert_allclose(comp, full[:, :-1], rtol=1e-5, atol=1e-6)
  del shift


def test_layernorm_shift_invariance_and_equality_with_rmsnorm_on_zero_mean():
  x = jax.random.normal(jax.random.key(0), (3, D))
  ln = norms.layer_normalize(x, 1e-6)
  np.testing.assert_allclose(norms.layer_normalize(x + 5.0, 1e-6), ln, atol=1e-4)
  xc = x - x.mean(-1, keepdims=True)
  np.testing.assert_allclose(norms.rms_normalize(xc, 1e-6), norms.layer_normalize(xc, 1e-6),
                             atol=1e-6)


@pytest.mark.parametrize("d,attn,other", [(512, 1.0, 1.0), (1024, 1.0, 1.0), (2048, 1.0, 0.5),
                                          (4096, 0.8, 0.2)])
def test_dyt_width_dependent_alpha_init(d, attn, other):
  cfg = NormConfig(kind="dyt")
  for role, want in (("attn", attn), ("attn_out", attn), ("mlp", other), ("final", other)):
    p = P.init(norms.specs(d, cfg, role), jax.random.key(0))
    assert float(p["alpha"]) == pytest.approx(want)
    np.testing.assert_array_equal(p["scale"], np.ones(d))
  p = P.init(norms.specs(d, NormConfig(kind="dyt", alpha_init=0.3, alpha_init_attn=0.7), "attn"),
             jax.random.key(0))
  assert float(p["alpha"]) == pytest.approx(0.7)
  assert NormConfig(kind="dyt").uses_embed_scale and not NormConfig().uses_embed_scale


def test_bhyt_lambda_by_role_and_final_norm_is_rmsnorm():
  cfg = NormConfig(kind="bhyt", bhyt_lambda_in=3.0, bhyt_lambda_post=1.5)
  assert float(P.init(norms.specs(D, cfg, "attn"), jax.random.key(0))["lambda"]) == 3.0
  assert float(P.init(norms.specs(D, cfg, "mlp_out"), jax.random.key(0))["lambda"]) == 1.5
  assert float(P.init(norms.specs(D, cfg, "attn_post"), jax.random.key(0))["lambda"]) == 1.5
  assert cfg.final().kind == "rmsnorm"
  assert NormConfig(kind="bhyt", final_kind="bhyt").final().kind == "bhyt"


def test_seednorm_with_zero_beta_is_rmsnorm():
  cfg = NormConfig(kind="seednorm")
  p = P.init(norms.specs(D, cfg), jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, D))
  np.testing.assert_allclose(norms.apply(p, x, cfg), norms.rmsnorm(x), rtol=1e-6)


@pytest.mark.parametrize("kind", STATELESS + ["prepbn", "repbn"])
def test_gradients_finite(kind):
  cfg = NormConfig(kind=kind)
  p = _init(cfg)
  x = jax.random.normal(jax.random.key(2), (2, 3, D))
  if cfg.is_stateful:
    state = P.init(norms.state_specs(D, cfg), jax.random.key(0))
    f = lambda p, x: jnp.sum(norms.apply_stateful(p, state, x, cfg, NormContext(True, 5))[0] ** 2)  # noqa: E731
  else:
    f = lambda p, x: jnp.sum(norms.apply(p, x, cfg) ** 2)  # noqa: E731
  gp, gx = jax.grad(f, argnums=(0, 1))(p, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves((gp, gx)))


def test_prepbn_lambda_schedule():
  cfg = NormConfig(kind="prepbn", prepbn_warmup_steps=10, prepbn_decay_steps=20)
  lam = [float(norms.prepbn_lambda(s, cfg)) for s in (0, 10, 20, 30, 40)]
  np.testing.assert_allclose(lam, [1.0, 1.0, 0.5, 0.0, 0.0])
  cfg0 = NormConfig(kind="prepbn", prepbn_warmup_steps=3, prepbn_decay_steps=0)
  assert [float(norms.prepbn_lambda(s, cfg0)) for s in (2, 3)] == [1.0, 0.0]


def test_repbn_batch_statistics_mask_padding_and_running_update():
  cfg = NormConfig(kind="repbn", momentum=0.5)
  p = P.init(norms.specs(D, cfg), jax.random.key(0))
  state = P.init(norms.state_specs(D, cfg), jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 6, D)) + 2.0
  mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
  x_padded = jnp.where(mask[..., None], x, 1e3)  # huge garbage in the padding
  y, new = norms.apply_stateful(p, state, x_padded, cfg, NormContext(True, 0, mask))
  real = np.asarray(x)[np.asarray(mask)]
  np.testing.assert_allclose(new["mean"], 0.5 * real.mean(0), rtol=1e-5)
  np.testing.assert_allclose(new["var"], 0.5 + 0.5 * real.var(0), rtol=1e-5)
  bn = (real - real.mean(0)) / np.sqrt(real.var(0) + cfg.eps)
  np.testing.assert_allclose(np.asarray(y)[np.asarray(mask)], bn + real, rtol=1e-4, atol=1e-4)
  # Evaluation: running statistics, state unchanged; equals the affine form used for folding.
  y_eval, same = norms.apply_stateful(p, new, x, cfg, NormContext(False, 0))
  assert same is new
  a, c = norms.repbn_affine(p, new, cfg)
  np.testing.assert_allclose(y_eval, x * a + c, rtol=1e-5, atol=1e-5)


def test_prepbn_blends_layernorm_and_repbn():
  cfg = NormConfig(kind="prepbn", prepbn_warmup_steps=0, prepbn_decay_steps=4)
  p = _init(cfg)
  state = P.init(norms.state_specs(D, cfg), jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, D))
  ln = norms.layernorm(x, p["scale"], None, cfg.eps)
  rep, _ = norms.apply_stateful(p, state, x, NormConfig(kind="repbn"), NormContext(True, 0))
  y, _ = norms.apply_stateful(p, state, x, cfg, NormContext(True, 1))
  np.testing.assert_allclose(y, 0.75 * ln + 0.25 * rep, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="apply_stateful"):
    norms.apply(p, x, cfg)
  with pytest.raises(ValueError, match="step"):
    norms.apply_stateful(p, state, x, cfg, NormContext(True, None))


@pytest.mark.parametrize("field,value,match", [
    ("kind", "batchnorm", "model.norm.kind"),
    ("momentum", 0.0, "momentum"),
    ("prepbn_decay_steps", -1, "prepbn_decay_steps"),
    ("alpha_init", -1.0, "alpha_init"),
    ("bhyt_kappa", 0.0, "bhyt_kappa"),
    ("final_kind", "prepbn", "final_kind"),
    ("embed_scale", "yes", "embed_scale"),
])
def test_invalid_options_name_the_key(field, value, match):
  with pytest.raises(ConfigError, match=match):
    NormConfig(**{field: value}).validate("model.norm")


def test_bias_rejected_for_kinds_without_bias():
  with pytest.raises(ConfigError, match="no bias"):
    NormConfig(kind="single_scale_rmsnorm", bias=True).validate()
  with pytest.raises(ValueError, match="role"):
    norms.specs(D, NormConfig(), "middle")


def test_output_norm_affine_overrides():
  cfg = norms.NormConfig(kind="rmsnorm", scale=False, out_scale=True, scale_offset=1.0)
  assert cfg.for_role("attn") is cfg and cfg.for_role("final") is cfg
  out = cfg.for_role("mlp_out")
  assert out.scale and out.scale_offset == 1.0 and out.out_scale is None
  assert "scale" not in norms.specs(8, cfg, "attn") and "scale" in norms.specs(8, cfg, "attn_out")
  with pytest.raises(ConfigError, match="norm.out_scale"):
    norms.NormConfig(out_scale="yes").validate()
  with pytest.raises(ConfigError, match="norm.out_bias"):
    norms.NormConfig(kind="single_scale_rmsnorm", out_bias=True).validate()
