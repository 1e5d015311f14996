"""FlashNorm (Graef et al.): fold norm weights into the following projections.

``Norm(a)·W = (a / RMS(a)) · (diag(g)·W)``: a norm's per-channel gain ``g`` (Gemma's ``(1 + w)``
included, via ``NormConfig.scale_offset``) moves into every projection that reads the norm, and
its bias ``β`` becomes an output bias ``c + β·W`` (LayerNorm, DyT). The model keeps weightless norms
(:func:`fold_norm_weights`). Mean-centring folds into the preceding linears instead — that is the
Pre-RMSNorm conversion in :mod:`jaxblocks.tricks.rmsnorm_conversion`.

With bias-free projections the normalisation can be deferred: ``(a / RMS(a))·W* = (a·W*)·(1/RMS(a))``,
so the matmul and the mean-square reduction are independent and can run in parallel
(:func:`deferred_rms_project`, :func:`check_deferrable`). A bias breaks this
(``(a/r)·W + b ≠ (a·W + b)/r``), which is reported as an error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks import norms
from jaxblocks.config import ModelConfig
from jaxblocks.tricks import folding
from jaxblocks.tricks.folding import ATTENTION_LAYOUTS, ConversionError

FOLDABLE_KINDS = ("rmsnorm", "layernorm", "crmsnorm", "dyt", "single_scale_rmsnorm")
# After folding, single-scale RMSNorm is a plain weightless RMSNorm.
_WEIGHTLESS_KIND = {"single_scale_rmsnorm": "rmsnorm"}
# Topologies whose folded norms (the sublayer inputs) feed only linear projections.
FLASHNORM_TOPOLOGIES = ("pre", "parallel", "peri")


def _gain_and_bias(norm_params, norm_cfg: norms.NormConfig, shape):
  """``(gain [..., d], bias [..., d] or None)`` of a norm's affine (stacked leading axes allowed)."""
  if "scale" in norm_params:
    scale = norm_params["scale"]
    gain = norm_cfg.scale_offset + scale
    if scale.ndim == len(shape) - 1:  # single-scale: one scalar per norm
      gain = jnp.broadcast_to(gain[..., None], shape)
  else:
    gain = jnp.ones(shape, jnp.float32)
  return gain, norm_params.get("bias")


def _weightless(norm_params):
  return {k: v for k, v in norm_params.items() if k not in ("scale", "bias")}


def fold_norm_weights(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Fold every norm's gain and bias into the projections reading it (``W ← diag(g)W``,
  ``b ← b + βW``; the final norm into an untied head) and return the weightless-norm model.

  Requires a norm kind in ``FOLDABLE_KINDS`` (DyT keeps its ``alpha``), a ``pre``/``parallel``/
  ``peri`` topology, no embedding norm and no dropout. Peri-LN (Gemma 2/3) folds its sublayer-input
  norms; the output norms keep their gains (``NormConfig.out_scale``/``out_bias``). LayerNorm
  Scaling multiplies folded biases by its per-layer factor. Exact up to floating-point rounding.
  """
  what = "flashnorm.fold_norm_weights"
  cfg.validate()
  for label, norm_cfg in (("model.norm.kind", cfg.norm), ("model.norm.final_kind", cfg.norm.final())):
    if norm_cfg.kind not in FOLDABLE_KINDS:
      raise ConversionError(f"{what}: {label}='{norm_cfg.kind}' has no foldable affine; "
                            f"supported kinds are {FOLDABLE_KINDS}")
  folding.check_foldable(cfg, what, FLASHNORM_TOPOLOGIES)
  if cfg.block.topology == "peri" and cfg.norm.kind in _WEIGHTLESS_KIND:
    raise ConversionError(f"{what}: model.norm.kind='{cfg.norm.kind}' changes kind when folded, "
                          "but a Peri-LN model's output norms keep theirs; use a per-channel kind")
  params, changes = folding.run_compiled(_fold_norm_weights, params, cfg)
  return params, folding.apply_config_changes(cfg, changes)


def _fold_norm_weights(params, cfg: ModelConfig):
  d = cfg.d_model
  affines = []
  layers = []
  for lp in params["layers"]:
    r = next(iter(lp["attn"].values())).shape[0]
    slots = folding.norm_readers(cfg)
    affines.append({s: _gain_and_bias(lp[s], cfg.norm, (r, d)) for s in slots})
    layers.append({**lp, **{s: _weightless(lp[s]) for s in slots}})
  params, changes = folding.fold_layer_norms({**params, "layers": layers}, cfg, affines)
  if cfg.final_norm:
    gain, bias = _gain_and_bias(params["final_norm"], cfg.norm.final(), (d,))
    params, head_changes = folding.fold_into_head(params, cfg, gain, bias)
    changes.update(head_changes)
    params["final_norm"] = _weightless(params["final_norm"])
  final_kind = cfg.norm.final_kind
  new_norm = dict(kind=_WEIGHTLESS_KIND.get(cfg.norm.kind, cfg.norm.kind), scale=False,
                  bias=False, scale_offset=0.0,
                  final_kind=None if final_kind is None else _WEIGHTLESS_KIND.get(final_kind,
                                                                                  final_kind))
  if cfg.block.topology == "peri":  # the output norms keep their affine (and its offset)
    out = cfg.norm.for_role("attn_out")
    new_norm.update(out_scale=out.scale, out_bias=out.bias,
                    scale_offset=cfg.norm.scale_offset if out.scale else 0.0)
  changes["norm"] = dataclasses.replace(cfg.norm, **new_norm)
  return params, changes


def deferred_rms_project(x, w, eps: float = 1e-6):
  """``rmsnorm(x) @ w`` computed as ``(x @ w) * rsqrt(mean(x²) + eps)``: the projection of the
  raw input and the mean-square reduction are independent. ``x [..., d]``, ``w [d, ...]`` with
  the RMSNorm gain already folded into ``w``; there must be no bias on this projection.
  Float32 statistics; the product is rescaled in float32 and returned in ``x``'s dtype."""
  if x.shape[-1] != w.shape[0]:
    raise ValueError(f"deferred_rms_project: x last dim {x.shape[-1]} != w first dim {w.shape[0]}")
  acc = norms.stat_dtype(x)
  y = jnp.tensordot(x, w, axes=1, preferred_element_type=acc)
  ms = jnp.mean(jnp.square(x.astype(acc)), axis=-1)
  inv = jax.lax.rsqrt(ms + eps)
  return (y * inv.reshape(inv.shape + (1,) * (w.ndim - 1))).astype(x.dtype)


def defer_normalization(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Switch a weightless-RMSNorm model (after :func:`fold_norm_weights`) to deferred
  normalisation (``NormConfig.deferred``): every block projects the raw residual stream and
  rescales by ``1/RMS(x)`` afterwards. Same logits up to floating-point rounding.

  All-zero query/key/value biases are dropped (``model.attention.bias`` becomes false); any
  non-zero bias on a projection reading a norm, or MLP biases, make deferral impossible and raise
  :class:`ConversionError`.
  """
  what = "flashnorm.defer_normalization"
  check_deferrable(params, cfg, head=False)  # the final norm is not deferred
  if set(cfg.attention_pattern) != {"softmax"}:
    raise ConversionError(f"{what}: supports softmax attention layers only, got "
                          f"{list(cfg.attention_pattern)}")
  if cfg.mlp.bias:
    raise ConversionError(f"{what}: model.mlp.bias=true: the MLP input projections would carry "
                          "biases; deferral needs bias-free input projections")
  layers = params["layers"]
  if cfg.attention.bias:
    layers = [{**lp, "attn": {k: v for k, v in lp["attn"].items() if k not in ("bq", "bk", "bv")}}
              for lp in layers]
  new_cfg = cfg.replace(norm=dataclasses.replace(cfg.norm, deferred=True),
                        attention=dataclasses.replace(cfg.attention, bias=False))
  new_cfg.validate()
  return {**params, "layers": layers}, new_cfg


def check_deferrable(params, cfg: ModelConfig, head: bool = True) -> None:
  """Raise :class:`ConversionError` unless every projection reading a norm can defer the
  normalisation: weightless RMSNorm (fold first) and bias-free input projections (and head, with
  ``head``)."""
  what = "flashnorm.check_deferrable"
  if cfg.norm.kind != "rmsnorm" or cfg.norm.scale or cfg.norm.bias:
    raise ConversionError(f"{what}: needs weightless RMSNorms (run fold_norm_weights first), got "
                          f"kind='{cfg.norm.kind}' scale={cfg.norm.scale} bias={cfg.norm.bias}")
  folding.check_foldable(cfg, what)
  for i, (kind, lp) in enumerate(zip(cfg.attention_pattern, params["layers"])):
    biased = [f"layers[{i}].attn.{b}" for b in ATTENTION_LAYOUTS[kind].input_projections.values()
              if b in lp["attn"] and bool(jnp.any(lp["attn"][b] != 0))]
    biased += [f"layers[{i}].mlp.{b}" for b in folding.mlp_input_projections(cfg).values()
               if b in lp["mlp"] and bool(jnp.any(lp["mlp"][b] != 0))]
    if biased:
      raise ConversionError(f"{what}: deferral is impossible with biases on the projections "
                            f"reading a norm ((a/r)W + b != (aW + b)/r): {biased}")
  if head and "head" in params and "b" in params["head"] and bool(jnp.any(params["head"]["b"] != 0)):
    raise ConversionError(f"{what}: deferral is impossible with a head bias")
