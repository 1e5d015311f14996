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


def perturb(params, key, std: float = 0.05):
  """Random offsets on every weight (so zero/one-initialised gains are not special)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [x + std * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])
