"""Slim attention conversion (Graef, 2025): cache K only, derive V from K.

For multi-head attention with a square key projection, ``V = X·W_V = K·W_KV`` with
``W_KV = W_K⁻¹·W_V``. :func:`convert` turns every ``softmax`` layer of a trained model into the
``slim_softmax`` kind (:mod:`jaxblocks.attention.slim`), computing ``W_KV`` in float64 with
NumPy and refusing ill-conditioned ``W_K`` (the inverse would amplify rounding errors).
:func:`cache_bytes` reports the decoding-cache size before and after (half for MHA).
"""

from __future__ import annotations

import jax
import numpy as np

from jaxblocks import params as P
from jaxblocks.attention import slim
from jaxblocks.config import ModelConfig
from jaxblocks.errors import ConfigError

DEFAULT_MAX_CONDITION = 1e6


def _convert_attention(p, d: int, n: int, h: int, max_condition: float, where: str):
  """One stacked attention tree ``{wq, wk, wv, wo, ...}`` → slim (``w_kv`` replaces ``wv``)."""
  wk = np.asarray(p["wk"], np.float64)
  wv = np.asarray(p["wv"], np.float64)
  layers = wk.shape[0]
  out = np.empty((layers, n, h, n, h), np.float64)
  for i in range(layers):
    k_mat, v_mat = wk[i].reshape(d, n * h), wv[i].reshape(d, n * h)
    cond = np.linalg.cond(k_mat)
    if not np.isfinite(cond) or cond > max_condition:
      raise ValueError(f"slim_attention.convert: {where} layer {i}: W_K has condition number "
                       f"{cond:.3g} > max_condition={max_condition:g}; W_K^-1 W_V would not "
                       "reproduce the values")
    out[i] = np.linalg.solve(k_mat, v_mat).reshape(n, h, n, h)
  new = {k: v for k, v in p.items() if k != "wv"}
  new["w_kv"] = out.astype(np.asarray(p["wv"]).dtype)
  return new


def _walk(tree, fn, path=""):
  """Apply ``fn`` to every dict that holds an attention's ``wk`` and ``wv``."""
  if isinstance(tree, dict):
    if "wk" in tree and "wv" in tree:
      return fn(tree, path)
    return {k: _walk(v, fn, f"{path}/{k}") for k, v in tree.items()}
  return tree


def convert(params, cfg: ModelConfig, max_condition: float = DEFAULT_MAX_CONDITION):
  """Return ``(new_params, new_cfg)`` where every softmax layer caches keys only.

  Preconditions (clear errors otherwise): MHA (``n_kv_heads == n_heads``), ``n_heads·head_dim
  == d_model``, no QK-norm, untied layers or tying without LoRA, ``cond(W_K) <= max_condition``.
  """
  from jaxblocks import model
  cfg.validate()
  if "softmax" not in cfg.attention_pattern:
    raise ConfigError("model.attention_pattern", "slim attention converts 'softmax' layers; "
                      f"there are none in {list(cfg.attention_pattern)}")
  slim.check_config(cfg.d_model, cfg.attention)
  if cfg.layer_tying.lora_rank:
    raise ConfigError("model.layer_tying.lora_rank", "per-layer LoRA deltas change W_K and W_V "
                      "per layer; slim attention needs one W_KV per stored layer")
  P.check_tree(params, model.specs(cfg), "slim_attention.convert: params")
  d, n, h = cfg.d_model, cfg.attention.n_heads, cfg.attention.dim(cfg.d_model)
  layers = []
  for pos, (kind, stack) in enumerate(zip(cfg.attention_pattern, params["layers"])):
    if kind == "softmax":
      stack = _walk(stack, lambda p, path: _convert_attention(
          p, d, n, h, max_condition, f"layers[{pos}]{path}"))
      stack = jax.tree.map(lambda a: jax.numpy.asarray(a), stack)
    layers.append(stack)
  new_cfg = cfg.replace(attention_pattern=tuple(
      "slim_softmax" if k == "softmax" else k for k in cfg.attention_pattern))
  new = dict(params)
  new["layers"] = layers
  P.check_tree(new, model.specs(new_cfg), "slim_attention.convert: result")
  return new, new_cfg


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
  """Bytes of the decoding cache of ``cfg`` for ``batch`` sequences of ``max_len`` tokens."""
  from jaxblocks import model
  shapes = jax.eval_shape(lambda: model.init_cache(cfg, batch, max_len, dtype))
  return int(sum(np.dtype(a.dtype).itemsize * int(np.prod(a.shape))
                 for a in jax.tree.leaves(shapes)))
