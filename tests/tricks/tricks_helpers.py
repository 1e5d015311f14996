"""Shared checks for the tricks tests."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks import model


def cached_logits(params, cfg, tokens, prompt_len: int, chunk: int = 1):
  """Logits of ``tokens`` computed by a prefill of ``prompt_len`` tokens and cached steps."""
  b, t = tokens.shape
  cache = model.init_cache(cfg, b, t + 2)
  step = jax.jit(model.apply_cached, static_argnums=2)
  logits, cache = step(params, tokens[:, :prompt_len], cfg, cache)
  outs, pos = [logits], prompt_len
  while pos < t:
    n = min(chunk, t - pos)
    logits, cache = step(params, tokens[:, pos:pos + n], cfg, cache)
    outs.append(logits)
    pos += n
  assert int(cache["index"]) == t
  return jnp.concatenate(outs, axis=1)


def assert_close_rel(a, b, rtol: float):
  """``max|a − b| <= rtol · max|b|`` (logits of random deep models vary in scale)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  err, scale = np.max(np.abs(a - b)), np.max(np.abs(b))
  assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol:g} * max|ref| {scale:.3g}"


def perturb(params, seed: int, std: float = 0.05):
  """Random offsets on every weight (so zero/one-initialised gains are not special); NumPy
  noise, so no random-number program is compiled per weight shape."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(std * rng.standard_normal(x.shape), x.dtype),
                      params)

apply = jax.jit(model.apply, static_argnums=2)
"""``model.apply`` compiled (configs are hashable); much faster than eager for unrolled layers."""


def init(cfg, key):
  """``model.init`` run eagerly: the same values, without compiling one init program per
  config (which dominates the run time of small tests)."""
  with jax.disable_jit():
    return model.init(cfg, key)
