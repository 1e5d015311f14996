"""Removing weights from skipless transformers (Graef).

In a transformer without skip connections and norms (topology ``skipless`` with norm kind
``none``) consecutive linear maps can be merged exactly:

* the attention output projection ``P`` merges into the next FFN's input matrices:
  ``M* = P·M`` (and the gate), ``b_M* = b_P·M + b_M``;
* a square, invertible query projection ``Q`` is removed: the block input becomes ``x·Q``, so
  the previous FFN's output matrix absorbs it (``O*_{i−1} = O_{i−1}·Q_i``, for block 1 the
  embedding: ``E* = E·Q_1``, learned positions too) and ``K* = Q⁻¹K``, ``V* = Q⁻¹V``. A query
  bias ``b_Q`` moves into the previous output bias (``b_O*·= b_O·Q + b_Q``) and the key/value
  biases become ``b_K − b_Q·Q⁻¹K``, ``b_V − b_Q·Q⁻¹V``.

That saves ``2d²`` weights per block. All products are computed in float64; ill-conditioned
``Q`` raise a clear error. The result runs as topology ``skipless_merged``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxblocks import mlp as mlp_lib
from jaxblocks import params as P
from jaxblocks.config import ModelConfig
from jaxblocks.errors import ConfigError

DEFAULT_MAX_CONDITION = 1e6


def check_config(cfg: ModelConfig) -> None:
  """Raise :class:`ConfigError` unless ``cfg`` is a norm-free skipless softmax model with square
  query projections."""
  if cfg.block.topology != "skipless":
    raise ConfigError("model.block.topology", "weight removal needs a model without skip "
                      f"connections (topology 'skipless'), got '{cfg.block.topology}'")
  if cfg.norm.kind != "none":
    raise ConfigError("model.norm.kind", "weight removal needs a model without norms inside the "
                      f"blocks (norm kind 'none'), got '{cfg.norm.kind}'")
  if tuple(cfg.attention_pattern) != ("softmax",):
    raise ConfigError("model.attention_pattern", "weight removal supports softmax attention in "
                      f"every layer, got {list(cfg.attention_pattern)}")
  a = cfg.attention
  if a.n_heads * a.dim(cfg.d_model) != cfg.d_model:
    raise ConfigError("model.attention.head_dim", "weight removal needs a square W_Q: n_heads * "
                      f"head_dim must equal d_model={cfg.d_model}, got {a.n_heads} * "
                      f"{a.dim(cfg.d_model)}")
  if cfg.layer_tying.unique_layers is not None:
    raise ConfigError("model.layer_tying.unique_layers", "weight removal needs untied layers "
                      "(each block's Q merges into its own predecessor)")


def convert(params, cfg: ModelConfig, max_condition: float = DEFAULT_MAX_CONDITION):
  """Return ``(new_params, new_cfg)``: ``W_Q`` and ``W_P`` removed from every block, same logits."""
  from jaxblocks import model
  cfg.validate()
  check_config(cfg)
  P.check_tree(params, model.specs(cfg), "skipless.convert: params")
  d = cfg.d_model
  f64 = lambda a: np.asarray(a, np.float64)
  stack = params["layers"][0]
  attn, mlp = stack["attn"], stack["mlp"]
  n_layers = cfg.n_layers
  gated = mlp_lib.KINDS[cfg.mlp.kind][1]
  hidden = cfg.mlp.hidden(d)
  needs_mlp_bias = cfg.mlp.bias or cfg.attention.out_bias or cfg.attention.bias

  wq = f64(attn["wq"]).reshape(n_layers, d, d)
  wk, wv = f64(attn["wk"]), f64(attn["wv"])
  kv_shape = wk.shape[2:]
  wk, wv = wk.reshape(n_layers, d, -1), wv.reshape(n_layers, d, -1)
  wo = f64(attn["wo"]).reshape(n_layers, d, d)
  w_up, w_down = f64(mlp["w_up"]), f64(mlp["w_down"])
  w_gate = f64(mlp["w_gate"]) if gated else None
  zeros = lambda *s: np.zeros(s, np.float64)
  b_up = f64(mlp["b_up"]) if "b_up" in mlp else zeros(n_layers, hidden)
  b_gate = (f64(mlp["b_gate"]) if "b_gate" in mlp else zeros(n_layers, hidden)) if gated else None
  b_down = f64(mlp["b_down"]) if "b_down" in mlp else zeros(n_layers, d)
  bq = f64(attn["bq"]).reshape(n_layers, d) if "bq" in attn else zeros(n_layers, d)
  bk = f64(attn["bk"]).reshape(n_layers, -1) if "bk" in attn else None
  bv = f64(attn["bv"]).reshape(n_layers, -1) if "bv" in attn else None
  bo = f64(attn["bo"]) if "bo" in attn else zeros(n_layers, d)

  new_k, new_v = np.empty_like(wk), np.empty_like(wv)
  new_bk = None if bk is None else np.empty_like(bk)
  new_bv = None if bv is None else np.empty_like(bv)
  new_up, new_b_up = np.einsum("lde,lef->ldf", wo, w_up), b_up + np.einsum("ld,ldf->lf", bo, w_up)
  new_gate = new_b_gate = None
  if gated:
    new_gate = np.einsum("lde,lef->ldf", wo, w_gate)
    new_b_gate = b_gate + np.einsum("ld,ldf->lf", bo, w_gate)
  new_down, new_b_down = w_down.copy(), b_down.copy()
  for i in range(n_layers):
    cond = np.linalg.cond(wq[i])
    if not np.isfinite(cond) or cond > max_condition:
      raise ValueError(f"skipless.convert: layer {i}: W_Q has condition number {cond:.3g} > "
                       f"max_condition={max_condition:g}; it cannot be removed exactly")
    q_inv_k = np.linalg.solve(wq[i], wk[i])
    q_inv_v = np.linalg.solve(wq[i], wv[i])
    new_k[i], new_v[i] = q_inv_k, q_inv_v
    if bk is not None:
      new_bk[i] = bk[i] - bq[i] @ q_inv_k
      new_bv[i] = bv[i] - bq[i] @ q_inv_v
    if i > 0:
      new_down[i - 1] = w_down[i - 1] @ wq[i]
      new_b_down[i - 1] = b_down[i - 1] @ wq[i] + bq[i]

  dtype = np.asarray(attn["wk"]).dtype
  cast = lambda a: jnp.asarray(a.astype(dtype))
  new_attn = {"wk": cast(new_k.reshape(n_layers, d, *kv_shape)),
              "wv": cast(new_v.reshape(n_layers, d, *kv_shape))}
  if bk is not None:
    new_attn["bk"] = cast(new_bk.reshape(n_layers, *kv_shape))
    new_attn["bv"] = cast(new_bv.reshape(n_layers, *kv_shape))
  for name in ("q_norm", "k_norm"):
    if name in attn:
      new_attn[name] = attn[name]
  new_mlp = {"w_up": cast(new_up), "w_down": cast(new_down)}
  if gated:
    new_mlp["w_gate"] = cast(new_gate)
  if needs_mlp_bias:
    new_mlp["b_up"], new_mlp["b_down"] = cast(new_b_up), cast(new_b_down)
    if gated:
      new_mlp["b_gate"] = cast(new_b_gate)

  # Block 1: the embedding absorbs Q_1 (and b_Q1, added once per token).
  embed = {k: f64(v) for k, v in params["embed"].items()}
  scale = math.sqrt(d) if cfg.scale_embeddings else 1.0
  new_embed = {"tokens": embed["tokens"] @ wq[0]}
  if "positions" in embed:
    new_embed["positions"] = embed["positions"] @ wq[0] + bq[0]
  else:
    new_embed["tokens"] = new_embed["tokens"] + bq[0] / scale
  new = {k: v for k, v in params.items() if k not in ("embed", "layers")}
  new["embed"] = {k: cast(v) for k, v in new_embed.items()}
  new["layers"] = [{"attn": new_attn, "mlp": new_mlp}]
  if cfg.tie_embeddings:
    new["head"] = {"w": jnp.asarray(params["embed"]["tokens"]).T}
  new_cfg = cfg.replace(block=_replace(cfg.block, topology="skipless_merged"),
                        mlp=_replace(cfg.mlp, bias=needs_mlp_bias), tie_embeddings=False,
                        head_bias=cfg.head_bias and not cfg.tie_embeddings)
  P.check_tree(new, model.specs(new_cfg), "skipless.convert: result")
  return new, new_cfg


def _replace(dc, **kw):
  import dataclasses
  return dataclasses.replace(dc, **kw)


def weights_removed(cfg: ModelConfig) -> int:
  """Weights the conversion removes: ``2d²`` per block (W_Q and W_P), biases aside."""
  return 2 * cfg.d_model * cfg.d_model * cfg.n_layers
