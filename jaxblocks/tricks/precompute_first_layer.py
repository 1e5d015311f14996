"""Precompute the first layer (Graef, 2024).

Everything layer 0 computes per token *before* tokens interact is a function of the token id
alone, as long as no absolute position is added to the embedding (RoPE is applied after the
projections, at run time). So it can be tabulated per vocabulary entry:

* parallel blocks (GPT-J / Pythia): ``x + FFN(Norm x)``, ``Norm(x)·W_Q``, ``Norm(x)·W_K``,
  ``Norm(x)·W_V`` — ``2(d+e)`` values per token with ``e = d·n_kv/n_heads`` — and layer 0's
  Q/K/V/FFN weights (and its norms) are deleted;
* sequential Pre-LN blocks (Llama): ``Norm(x)·W_Q/K/V`` only; the raw embedding stays for the
  skip connection and layer 0 keeps its FFN.

Queries/keys include biases and QK-norm (both per token). The converted model is an ordinary
model variant: ``ModelConfig.precomputed_first_layer = True`` and the table lives in
``params["embed"]["first_layer"]``; ``model.apply``, ``apply_cached`` and ``generate`` run it.

At batch 1 the decode step of layer 0 then reads ``2(d+e)`` (or ``d+2e``) table values instead of
its weight matrices, so the saving approaches ``1/n_layers`` of the weight reads; the price is
memory: :func:`memory_tradeoff` gives the paper's count and the measured bytes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks import blocks
from jaxblocks import mlp as mlp_lib
from jaxblocks import norms
from jaxblocks import params as P
from jaxblocks.attention import softmax
from jaxblocks.config import ModelConfig
from jaxblocks.errors import ConfigError

TOPOLOGIES = ("parallel", "pre")


def check_config(cfg: ModelConfig) -> None:
  """Raise :class:`ConfigError` when the first layer of ``cfg`` cannot be precomputed."""
  if cfg.position_embedding != "none":
    raise ConfigError("model.position_embedding", "precomputing the first layer needs a model "
                      "without absolute position embeddings (use RoPE); got "
                      f"'{cfg.position_embedding}'")
  if cfg.block.topology not in TOPOLOGIES:
    raise ConfigError("model.block.topology", f"precomputing the first layer supports "
                      f"{list(TOPOLOGIES)}, got '{cfg.block.topology}'")
  if tuple(cfg.attention_pattern) != ("softmax",):
    raise ConfigError("model.attention_pattern", "precomputing the first layer supports "
                      f"softmax attention in every layer, got {list(cfg.attention_pattern)}")
  if cfg.n_layers < 2:
    raise ConfigError("model.n_layers", f"precomputing the first layer needs >= 2 layers, got "
                      f"{cfg.n_layers}")
  if cfg.block.embed_norm:
    raise ConfigError("model.block.embed_norm", "precomputing the first layer supports models "
                      "without an embedding norm")
  if cfg.norm.is_stateful:
    raise ConfigError("model.norm.kind", f"norm kind '{cfg.norm.kind}' keeps running statistics; "
                      "precomputing the first layer needs a stateless norm")
  if cfg.layer_tying.unique_layers is not None:
    raise ConfigError("model.layer_tying.unique_layers", "tied layers share layer 0's weights; "
                      "precomputing the first layer needs untied layers")


def _parallel(cfg: ModelConfig) -> bool:
  return cfg.block.topology == "parallel"


def adapt_specs(s, cfg: ModelConfig) -> None:
  """Turn the spec tree of the original model into the precomputed variant (in place)."""
  check_config(cfg)
  a = cfg.attention
  v, d = cfg.vocab_size, cfg.d_model
  n, k, h = a.n_heads, a.kv_heads(), a.dim(d)
  init = P.normal(cfg.init_std)
  table = {
      "q": P.ParamSpec((v, n, h), ("vocab", "heads", "head_dim"), init),
      "k": P.ParamSpec((v, k, h), ("vocab", "kv_heads", "head_dim"), init),
      "v": P.ParamSpec((v, k, h), ("vocab", "kv_heads", "head_dim"), init),
  }
  layer = blocks.specs(cfg, "softmax")
  first = {"attn": {name: layer["attn"][name] for name in ("wo", "bo") if name in layer["attn"]}}
  if _parallel(cfg):
    table["x"] = P.ParamSpec((v, d), ("vocab", "embed"), init)
    if not cfg.tie_embeddings:
      del s["embed"]["tokens"]
  else:
    first["mlp_norm"], first["mlp"] = layer["mlp_norm"], layer["mlp"]
  s["embed"]["first_layer"] = table
  s["first_layer"] = first
  s["layers"] = [P.stack(layer, cfg.repeats - 1)]


def run_first_layer(params, tokens, cfg: ModelConfig, ctx, cache):
  """Layer 0 of a precomputed model: table look-ups, RoPE + attention, output projection (and
  the FFN for sequential blocks). Returns ``(x_btd, new_first_layer_cache)``."""
  from jaxblocks import model
  table = params["embed"]["first_layer"]
  q, k, v = (jnp.take(table[name], tokens, axis=0) for name in ("q", "k", "v"))
  o, new_cache = softmax.attend_with_cache(q, k, v, cfg.attention, ctx, cache)
  a = softmax.output_projection(params["first_layer"]["attn"], o)
  if _parallel(cfg):
    return jnp.take(table["x"], tokens, axis=0) + a, new_cache
  x = model.embed(params, tokens, cfg, ctx.positions) + a
  first = params["first_layer"]
  h = norms.apply(first["mlp_norm"], x, cfg.norm)
  return x + blocks.mlp_sublayer(first["mlp"], h, cfg), new_cache


def convert(params, cfg: ModelConfig):
  """Precompute layer 0 of a trained model: returns ``(new_params, new_cfg)`` with the same
  logits (prefill and cached decoding). Tables are computed in float32 over the whole
  vocabulary and stored in the model's parameter dtype."""
  from jaxblocks import model
  cfg.validate()
  check_config(cfg)
  if cfg.precomputed_first_layer:
    raise ValueError("precompute_first_layer.convert: the model's first layer is already "
                     "precomputed (model.precomputed_first_layer=True)")
  P.check_tree(params, model.specs(cfg), "precompute_first_layer.convert: params")
  new_cfg = cfg.replace(precomputed_first_layer=True)
  f32 = P.cast_floating(params, jnp.float32)
  layer0 = jax.tree.map(lambda a: a[0], f32["layers"][0])
  ids = jnp.arange(cfg.vocab_size, dtype=jnp.int32)[None]
  x = model.embed(f32, ids, cfg, jnp.zeros_like(ids))
  h_attn = norms.apply(layer0["attn_norm"], x, cfg.norm)
  q, k, v = softmax.qkv_before_rope(layer0["attn"], h_attn, cfg.attention)
  table = {"q": q[0], "k": k[0], "v": v[0]}
  first = {"attn": {name: params["layers"][0]["attn"][name][0]
                    for name in ("wo", "bo") if name in layer0["attn"]}}
  embed_params = dict(params["embed"])
  if _parallel(cfg):
    h_mlp = h_attn if cfg.block.parallel_shared_norm else norms.apply(layer0["mlp_norm"], x,
                                                                        cfg.norm)
    table["x"] = (x + mlp_lib.apply(layer0["mlp"], h_mlp, cfg.mlp))[0]
    if not cfg.tie_embeddings:
      del embed_params["tokens"]
  else:
    first["mlp_norm"] = jax.tree.map(lambda a: a[0], params["layers"][0]["mlp_norm"])
    first["mlp"] = jax.tree.map(lambda a: a[0], params["layers"][0]["mlp"])
  embed_params["first_layer"] = jax.tree.map(lambda a: a.astype(cfg.weight_dtype), table)
  new = {key: val for key, val in params.items() if key not in ("embed", "layers")}
  new["embed"] = embed_params
  new["first_layer"] = first
  new["layers"] = [jax.tree.map(lambda a: a[1:], params["layers"][0])]
  P.check_tree(new, model.specs(new_cfg), "precompute_first_layer.convert: result")
  return new, new_cfg


def _nbytes(tree) -> int:
  return int(sum(np.dtype(a.dtype).itemsize * a.size for a in jax.tree.leaves(tree)))


def memory_tradeoff(cfg: ModelConfig, params=None, new_params=None) -> dict:
  """Memory cost of precomputing ``cfg``'s first layer.

  The paper's count: per vocabulary entry the table holds ``2(d+e)`` values for parallel blocks
  (``d+2e`` for sequential ones, where the embedding stays), with ``e = n_kv·head_dim`` and
  ``d`` replaced by ``n_heads·head_dim`` for queries; the removed weights are layer 0's
  Q/K/V (+ FFN and norms for parallel blocks). With ``params``/``new_params`` the measured bytes
  of both parameter trees are added.
  """
  from jaxblocks import model
  a = cfg.attention
  d, vocab = cfg.d_model, cfg.vocab_size
  q_width, e = a.n_heads * a.dim(d), a.kv_heads() * a.dim(d)
  layer = blocks.specs(cfg, "softmax")
  removed = P.count(layer["attn"]) - P.count({n: layer["attn"][n] for n in ("wo", "bo")
                                               if n in layer["attn"]})
  removed += P.count(layer["attn_norm"])
  per_token = q_width + 2 * e
  embedding_dropped = 0
  if _parallel(cfg):
    per_token += d
    removed += P.count(layer["mlp"]) + P.count(layer.get("mlp_norm", {}))
    if not cfg.tie_embeddings:
      embedding_dropped = vocab * d
  out = {
      "topology": cfg.block.topology,
      "table_values_per_token": per_token,
      "table_values": vocab * per_token,
      "embedding_values_dropped": embedding_dropped,
      "layer0_weight_values_removed": removed,
      "net_values_added": vocab * per_token - embedding_dropped - removed,
      "total_values_original": model.count_params(cfg),
  }
  if params is not None and new_params is not None:
    out["measured_bytes_original"] = _nbytes(params)
    out["measured_bytes_precomputed"] = _nbytes(new_params)
    out["measured_bytes_added"] = out["measured_bytes_precomputed"] - out["measured_bytes_original"]
  return out
