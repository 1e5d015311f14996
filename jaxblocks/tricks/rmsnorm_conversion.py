"""Exact Pre-LN → Pre-RMSNorm → Pre-CRMSNorm conversions (Jiang et al., NeurIPS 2023).

``LN(x + c·1) = LN(x)``, so a Pre-LN model is unchanged when its residual stream is shifted by a
per-token constant. Make the stream zero-mean — subtract the hidden-axis mean from every embedding
row and from every branch output projection along its OUTPUT axis — and every LN sees zero-mean
input, where LN equals RMSNorm. With the LN affines folded into the next linears the norms become
weightless RMSNorms (:func:`to_pre_rmsnorm`).

A zero-mean d-vector is determined by its first d−1 coordinates (``x_d = −Σ x_i``), so the stream
can be stored with d−1 numbers and normalised with CRMSNorm (:func:`to_pre_crmsnorm`): drop the
last embedding column and the last output column of every output projection; for every input
projection and the head, subtract the last input row from the others and drop it.

Both are pure functions ``(params, cfg) -> (params, cfg)``; the returned config describes the
returned params. Preconditions are checked and a :class:`ConversionError` names what is wrong.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks.config import ModelConfig
from jaxblocks.norms import NormConfig
from jaxblocks.tricks import folding
from jaxblocks.tricks.folding import ATTENTION_LAYOUTS, ConversionError


def _affine(norm_params, norm_cfg: NormConfig, shape):
  gain = (norm_cfg.scale_offset + norm_params["scale"]) if "scale" in norm_params else None
  if gain is None:
    gain = jnp.ones(shape, jnp.float32)
  return gain, norm_params.get("bias")


def _center_last(x):
  return x - jnp.mean(x, axis=-1, keepdims=True)


def _recenter_outputs(params, cfg: ModelConfig):
  """Every branch output projection and its bias made zero-mean along the OUTPUT (model) axis."""
  layers = []
  for kind, lp in zip(cfg.attention_pattern, params["layers"]):
    layout = ATTENTION_LAYOUTS[kind]
    attn, mlp = dict(lp["attn"]), dict(lp["mlp"])
    attn[layout.output_projection] = _center_last(attn[layout.output_projection])
    if layout.output_bias in attn:
      attn[layout.output_bias] = _center_last(attn[layout.output_bias])
    mlp["w_down"] = _center_last(mlp["w_down"])
    if "b_down" in mlp:
      mlp["b_down"] = _center_last(mlp["b_down"])
    layers.append({**lp, "attn": attn, "mlp": mlp})
  return {**params, "layers": layers}


def _recenter_embeddings(params):
  embed = {k: (_center_last(v) if k in ("tokens", "positions") else v)
           for k, v in params["embed"].items()}
  return {**params, "embed": embed}


def to_pre_rmsnorm(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Convert a Pre-LN model to an equivalent Pre-RMSNorm model with weightless norms.

  Steps: fold each LN affine into the projections reading it (``W ← diag(γ)W``, ``b ← b + βW``;
  the final LN into an untied head), re-centre the embedding tables (tokens, learned positions)
  and every branch output projection (attention out-proj ``[..., d]``, MLP down-proj ``[f, d]``
  and their biases) along the output axis, and replace every LN by a weightless RMSNorm.
  Requires: ``model.norm.kind == 'layernorm'``, a ``pre`` or ``parallel`` topology, a final
  norm, no embedding norm, no dropout. LayerNorm Scaling is kept (it scales after the norm).
  """
  what = "to_pre_rmsnorm"
  cfg.validate()
  if cfg.norm.kind != "layernorm" or cfg.norm.final().kind != "layernorm":
    raise ConversionError(f"{what}: needs model.norm.kind='layernorm' (and a layernorm final "
                          f"norm), got '{cfg.norm.kind}'/'{cfg.norm.final().kind}'")
  folding.check_foldable(cfg, what)
  if not cfg.final_norm:
    raise ConversionError(f"{what}: model.final_norm=False — the head would read the shifted "
                          "residual stream directly; the conversion needs the final LayerNorm")
  params, changes = folding.run_compiled(_to_pre_rmsnorm, params, cfg)
  return params, folding.apply_config_changes(cfg, changes)


def _to_pre_rmsnorm(params, cfg: ModelConfig):
  d = cfg.d_model
  affines = []
  for lp in params["layers"]:
    r = next(iter(lp["attn"].values())).shape[0]
    affines.append({slot: _affine(lp[slot], cfg.norm, (r, d))
                    for slot in folding.norm_readers(cfg)})
  params, changes = folding.fold_layer_norms(params, cfg, affines)
  gain, bias = _affine(params["final_norm"], cfg.norm, (d,))
  params, head_changes = folding.fold_into_head(params, cfg, gain, bias)
  changes.update(head_changes)
  params = _recenter_embeddings(_recenter_outputs(params, cfg))
  weightless = {slot: {} for slot in folding.norm_readers(cfg)}
  params["layers"] = [{**lp, **weightless} for lp in params["layers"]]
  params["final_norm"] = {}
  changes["norm"] = NormConfig(kind="rmsnorm", eps=cfg.norm.eps, scale=False, bias=False)
  return params, changes


@jax.jit
def _mean_and_scale(tree):
  return jax.tree.map(lambda x: (jnp.max(jnp.abs(jnp.mean(x, axis=-1))), jnp.max(jnp.abs(x))),
                      tree)


def _check_zero_mean(named_arrays: dict, what: str) -> None:
  """Every array must be zero-mean along its last (model) axis, up to rounding."""
  for name, (err, scale) in _mean_and_scale(named_arrays).items():
    err, scale = float(err), float(scale) + 1e-30
    tol = 1e-5 if named_arrays[name].dtype == jnp.float64 else 1e-4
    if err > tol * scale:
      raise ConversionError(f"{what}: {name} is not zero-mean along the model axis (max |mean| "
                            f"{err:.3g} vs max |w| {scale:.3g}); the residual stream must be "
                            "re-centred first (to_pre_rmsnorm)")


def _compress_inputs(w):
  """Input projection ``[r, d, ...]`` reading a compressed (d−1) zero-mean stream."""
  return w[:, :-1] - w[:, -1:]


def to_pre_crmsnorm(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Convert a Pre-RMSNorm model with a zero-mean residual stream (the output of
  :func:`to_pre_rmsnorm`) to Pre-CRMSNorm: the stream is stored as its first d−1 coordinates.

  Requires weightless RMSNorms (fold gains first, e.g. :func:`jaxblocks.tricks.flashnorm.fold_norm_weights`),
  a ``pre``/``parallel`` topology, a final norm, and zero-mean embeddings and output projections
  (checked). The new config has ``d_model = d − 1`` with ``attention.head_dim`` and ``mlp.d_ff``
  pinned, ``scale_embeddings`` folded into the table and an untied head.
  """
  what = "to_pre_crmsnorm"
  cfg.validate()
  if cfg.norm.kind != "rmsnorm" or cfg.norm.final().kind != "rmsnorm":
    raise ConversionError(f"{what}: needs model.norm.kind='rmsnorm', got '{cfg.norm.kind}'")
  if cfg.norm.scale or cfg.norm.bias:
    raise ConversionError(f"{what}: the RMSNorms carry a per-channel scale/bias; fold them into "
                          "the projections first (jaxblocks.tricks.flashnorm.fold_norm_weights)")
  folding.check_foldable(cfg, what)
  if not cfg.final_norm:
    raise ConversionError(f"{what}: model.final_norm=False; the head must read a normalised stream")
  if cfg.d_model < 2:
    raise ConversionError(f"{what}: model.d_model must be >= 2")
  named = {f"embed.{k}": v for k, v in params["embed"].items() if k in ("tokens", "positions")}
  for i, (kind, lp) in enumerate(zip(cfg.attention_pattern, params["layers"])):
    layout = ATTENTION_LAYOUTS[kind]
    for sub, key in (("attn", layout.output_projection), ("attn", layout.output_bias),
                     ("mlp", "w_down"), ("mlp", "b_down")):
      if key in lp[sub]:
        named[f"layers[{i}].{sub}.{key}"] = lp[sub][key]
  _check_zero_mean(named, what)
  params, changes = folding.run_compiled(_to_pre_crmsnorm, params, cfg)
  return params, folding.apply_config_changes(cfg, changes)


def _to_pre_crmsnorm(params, cfg: ModelConfig):
  d = cfg.d_model
  params, changes = folding.fold_embedding_scale(params, cfg)
  params, untie = folding.untie_head(params, cfg)
  changes.update(untie)
  embed = {k: (v[..., :-1] if k in ("tokens", "positions") else v)
           for k, v in params["embed"].items()}
  layers = []
  for kind, lp in zip(cfg.attention_pattern, params["layers"]):
    layout = ATTENTION_LAYOUTS[kind]
    attn, mlp = dict(lp["attn"]), dict(lp["mlp"])
    for w_name in layout.input_projections:
      attn[w_name] = _compress_inputs(attn[w_name])
    for w_name in folding.mlp_input_projections(cfg):
      mlp[w_name] = _compress_inputs(mlp[w_name])
    attn[layout.output_projection] = attn[layout.output_projection][..., :-1]
    if layout.output_bias in attn:
      attn[layout.output_bias] = attn[layout.output_bias][..., :-1]
    mlp["w_down"] = mlp["w_down"][..., :-1]
    if "b_down" in mlp:
      mlp["b_down"] = mlp["b_down"][..., :-1]
    layers.append({**lp, "attn": attn, "mlp": mlp})
  head = dict(params["head"])
  head["w"] = head["w"][:-1] - head["w"][-1:]
  params = {**params, "embed": embed, "layers": layers, "head": head}
  changes.update({
      "d_model": d - 1,
      "attention": dataclasses.replace(cfg.attention, head_dim=cfg.attention.dim(d)),
      "mlp": dataclasses.replace(cfg.mlp, d_ff=cfg.mlp.hidden(d)),
      "norm": dataclasses.replace(cfg.norm, kind="crmsnorm", final_kind=None),
  })
  return params, changes
