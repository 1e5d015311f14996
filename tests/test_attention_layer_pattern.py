"""Per-layer attention options: sliding-window pattern and local RoPE theta (Gemma 2/3 style),
QK-norm gain offset; scanned (traced layer index) == unrolled (static) == cached decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import model
from jaxblocks.errors import ConfigError
from tests.helpers import tiny_config, tokens

PATTERN = jb.AttentionConfig(n_heads=4, n_kv_heads=2, sliding_window=3,
                             sliding_window_pattern=(True, False, True), rope_theta=1e4,
                             rope_theta_local=50.0, qk_norm="head", qk_norm_offset=1.0)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _apply(params, t, cfg):
  return jax.jit(lambda p, x: model.apply(p, x, cfg))(params, t)


def _params(cfg, seed=0):
  params = model.init(cfg, jax.random.key(seed))
  # non-trivial QK-norm weights
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape)
      if "norm" in jax.tree_util.keystr(p) else x, params)


def test_scan_unrolled_and_cache_agree():
  cfg = tiny_config(n_layers=3, attention=PATTERN)
  params = _params(cfg)
  t = tokens(time=10)
  scanned = _apply(params, t, cfg)
  unrolled = _apply(params, t, cfg.replace(scan_layers=False))
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)
  cache = model.init_cache(cfg, 2, 10)
  step = jax.jit(lambda p, x, c: model.apply_cached(p, x, cfg, c))
  steps = []
  for i in range(10):
    logits, cache = step(params, t[:, i:i + 1], cache)
    steps.append(logits[:, 0])
  np.testing.assert_allclose(jnp.stack(steps, 1), scanned, rtol=1e-4, atol=1e-4)


def test_pattern_equals_per_layer_models():
  """Layer l of the patterned model computes what a model with that layer's fixed window and
  theta computes: check through a 1-layer model per pattern entry."""
  t = tokens(time=10)
  for local in (True, False):
    attn = dataclasses.replace(PATTERN, sliding_window_pattern=(local,))
    fixed = dataclasses.replace(PATTERN, sliding_window_pattern=None,
                                sliding_window=3 if local else None,
                                rope_theta=50.0 if local else 1e4, rope_theta_local=None)
    cfg_p, cfg_f = tiny_config(n_layers=1, attention=attn), tiny_config(n_layers=1, attention=fixed)
    params = _params(cfg_p)
    np.testing.assert_allclose(_apply(params, t, cfg_p), _apply(params, t, cfg_f),
                               rtol=1e-5, atol=1e-5)
  # and the window matters: all-local differs from all-global
  a = tiny_config(n_layers=1, attention=dataclasses.replace(PATTERN, sliding_window_pattern=(True,)))
  b = tiny_config(n_layers=1, attention=dataclasses.replace(PATTERN, sliding_window_pattern=(False,)))
  params = _params(a)
  assert not np.allclose(_apply(params, t, a), _apply(params, t, b), atol=1e-3)


def test_qk_norm_offset_is_a_reparametrisation():
  cfg1 = tiny_config(n_layers=1, attention=PATTERN)
  cfg0 = tiny_config(n_layers=1, attention=dataclasses.replace(PATTERN, qk_norm_offset=0.0))
  params = _params(cfg1)
  shifted = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 1.0 if "q_norm" in jax.tree_util.keystr(p) or "k_norm" in
      jax.tree_util.keystr(p) else x, params)
  t = tokens(time=8)
  np.testing.assert_allclose(_apply(params, t, cfg1), _apply(shifted, t, cfg0),
                             rtol=1e-5, atol=1e-5)
  init = model.init(cfg1, jax.random.key(0))
  assert float(jnp.abs(init["layers"][0]["attn"]["q_norm"]).max()) == 0.0


def test_pattern_config_errors():
  with pytest.raises(ConfigError, match="sliding_window_pattern.*needs sliding_window"):
    tiny_config(attention=jb.AttentionConfig(sliding_window_pattern=(True,)))
  with pytest.raises(ConfigError, match="sliding_window_pattern"):
    tiny_config(attention=jb.AttentionConfig(sliding_window=2, sliding_window_pattern=()))
  with pytest.raises(ConfigError, match="rope_theta_local"):
    tiny_config(attention=jb.AttentionConfig(rope_theta_local=-1.0))
