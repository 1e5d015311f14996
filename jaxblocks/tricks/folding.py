"""Folding per-channel affines into the linear maps that read a norm's output.

Shared by the exact conversions (:mod:`rmsnorm_conversion`, :mod:`flashnorm`, :mod:`prepbn_fold`):
if a norm's output ``n ⊙ a + c`` feeds only linear projections ``y = h W + b``, then
``y = n (diag(a) W) + (b + c W)``, so the norm can lose its affine. This module knows which
projections read which norm in the ``pre`` and ``parallel`` topologies and how every weight of an
attention kind and of the MLP is laid out. Layer params are stacked ``[repeats, ...]``.

Attention kinds other than ``softmax`` declare their layout with :func:`register_attention_layout`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxblocks import mlp as mlp_lib
from jaxblocks.config import ModelConfig


class ConversionError(ValueError):
  """A model does not meet the preconditions of an exact weight conversion."""


@dataclasses.dataclass(frozen=True)
class AttentionLayout:
  """input_projections: ``{weight: bias}`` of the maps reading the layer input, each weight
  ``[d_model, ...]`` and its bias ``[...]`` (the bias key is created when folding needs it and
  ``bias_config`` — an ``AttentionConfig`` field — is then switched on);
  output_projection / output_bias: the map writing the residual stream, weight ``[..., d_model]``.
  """

  input_projections: dict[str, str]
  output_projection: str
  output_bias: str
  bias_config: str


ATTENTION_LAYOUTS: dict[str, AttentionLayout] = {
    "softmax": AttentionLayout({"wq": "bq", "wk": "bk", "wv": "bv"}, "wo", "bo", "bias"),
}


def register_attention_layout(kind: str, layout: AttentionLayout) -> None:
  """Declare how an attention kind's weights read and write the residual stream."""
  ATTENTION_LAYOUTS[kind] = layout


FOLDABLE_TOPOLOGIES = ("pre", "parallel")


def mlp_input_projections(cfg: ModelConfig) -> dict[str, str]:
  gated = mlp_lib.KINDS[cfg.mlp.kind][1]
  return {"w_up": "b_up", **({"w_gate": "b_gate"} if gated else {})}


def check_dropout(cfg: ModelConfig, what: str) -> None:
  """Dropout on a branch breaks every exact conversion (the re-centred / folded model differs in
  the noise it sees); refuse configs that declare any non-zero dropout rate."""
  for owner, sub in (("model", cfg), ("model.attention", cfg.attention), ("model.mlp", cfg.mlp),
                     ("model.block", cfg.block)):
    for field in dataclasses.fields(sub):
      if "dropout" in field.name and getattr(sub, field.name):
        raise ConversionError(f"{what}: {owner}.{field.name}={getattr(sub, field.name)}; dropout "
                              "on a branch makes the conversion inexact — set it to 0 first")


def check_foldable(cfg: ModelConfig, what: str, topologies=FOLDABLE_TOPOLOGIES) -> None:
  """Preconditions shared by every fold: the folded norms' outputs feed linear maps only."""
  check_dropout(cfg, what)
  if cfg.block.topology not in topologies:
    raise ConversionError(f"{what}: model.block.topology='{cfg.block.topology}' is not supported; "
                          f"the norm outputs must feed linear projections only, as in "
                          f"{topologies} (other topologies' norms write the residual stream or "
                          "carry a per-channel scale on the branch output)")
  if cfg.block.embed_norm:
    raise ConversionError(f"{what}: model.block.embed_norm=True writes the residual stream; the "
                          "conversion needs it off")
  for kind in cfg.attention_pattern:
    if kind not in ATTENTION_LAYOUTS:
      raise ConversionError(f"{what}: attention kind '{kind}' has no registered weight layout "
                            f"(known: {sorted(ATTENTION_LAYOUTS)}); see "
                            "jaxblocks.tricks.folding.register_attention_layout")


def norm_readers(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
  """Which sublayers read each norm slot of a layer."""
  if cfg.block.topology == "parallel" and cfg.block.parallel_shared_norm:
    return {"attn_norm": ("attn", "mlp")}
  return {"attn_norm": ("attn",), "mlp_norm": ("mlp",)}


def ln_scaling_factors(cfg: ModelConfig, position: int):
  """``[repeats]`` LayerNorm-Scaling factors ``1/sqrt(l)`` of pattern position ``position``
  (ones when the modifier is off): the scalar applied to the norm output before the
  projections, which multiplies a folded bias."""
  if not cfg.block.ln_scaling:
    return jnp.ones((cfg.repeats,), jnp.float32)
  layers = jnp.arange(cfg.repeats) * cfg.period + position + 1
  return 1.0 / jnp.sqrt(layers.astype(jnp.float32))


def _fold_into(params: dict, projections: dict[str, str], gain_rd, bias_rd):
  """Fold ``n ⊙ gain + bias`` into stacked projections ``w [r, d, ...]`` (biases ``[r, ...]``).
  Returns (new params, whether a bias was created or changed)."""
  out = dict(params)
  needs_bias = bias_rd is not None
  for w_name, b_name in projections.items():
    w = params[w_name]
    g = gain_rd.reshape(gain_rd.shape + (1,) * (w.ndim - 2)).astype(w.dtype)
    out[w_name] = w * g
    if needs_bias:
      extra = jnp.einsum("rd,rd...->r...", bias_rd.astype(w.dtype), w)
      out[b_name] = params.get(b_name, jnp.zeros(extra.shape, w.dtype)) + extra
  return out, needs_bias


def fold_layer_norms(params, cfg: ModelConfig, affines) -> tuple[dict, dict]:
  """Fold per-layer norm affines into the projections reading them.

  ``affines[i][slot] = (gain [r, d], bias [r, d] or None)`` for pattern position ``i``; the norm
  params of those slots are left untouched (the caller replaces them). Returns the new params and
  the config changes needed for newly created biases (``{"attention.bias": True, ...}``).
  """
  readers = norm_readers(cfg)
  layers = []
  changes: dict[str, bool] = {}
  for i, (kind, lp) in enumerate(zip(cfg.attention_pattern, params["layers"])):
    lp = dict(lp)
    layout = ATTENTION_LAYOUTS[kind]
    for slot, (gain, bias) in affines[i].items():
      if bias is not None:
        bias = bias * ln_scaling_factors(cfg, i)[:, None]
      for sub in readers[slot]:
        if sub == "attn":
          lp["attn"], made = _fold_into(lp["attn"], layout.input_projections, gain, bias)
          if made:
            changes["attention." + layout.bias_config] = True
        else:
          lp["mlp"], made = _fold_into(lp["mlp"], mlp_input_projections(cfg), gain, bias)
          if made:
            changes["mlp.bias"] = True
    layers.append(lp)
  params = {**params, "layers": layers}
  # Created biases come with their siblings in the config: add the missing ones as zeros.
  params = _complete_biases(params, cfg, changes)
  return params, changes


def _complete_biases(params, cfg: ModelConfig, changes):
  layers = []
  for kind, lp in zip(cfg.attention_pattern, params["layers"]):
    lp = dict(lp)
    if changes.get("attention." + ATTENTION_LAYOUTS[kind].bias_config):
      lp["attn"] = _with_zero_biases(lp["attn"], ATTENTION_LAYOUTS[kind].input_projections)
    if changes.get("mlp.bias"):
      mlp = _with_zero_biases(lp["mlp"], mlp_input_projections(cfg))
      if "b_down" not in mlp:
        w = mlp["w_down"]
        mlp["b_down"] = jnp.zeros((w.shape[0], w.shape[-1]), w.dtype)
      lp["mlp"] = mlp
    layers.append(lp)
  return {**params, "layers": layers}


def _with_zero_biases(p, projections):
  p = dict(p)
  for w_name, b_name in projections.items():
    if b_name not in p:
      w = p[w_name]
      p[b_name] = jnp.zeros((w.shape[0],) + w.shape[2:], w.dtype)
  return p


def apply_config_changes(cfg: ModelConfig, changes: dict[str, object]) -> ModelConfig:
  """``{"attention.bias": True, "mlp.d_ff": 64, "d_model": 15}`` → a new config."""
  top, subs = {}, {}
  for key, value in changes.items():
    if "." in key:
      sub, field = key.split(".", 1)
      subs.setdefault(sub, {})[field] = value
    else:
      top[key] = value
  for sub, fields in subs.items():
    top[sub] = dataclasses.replace(getattr(cfg, sub), **fields)
  return cfg.replace(**top).validate()


def run_compiled(transform, params, *args):
  """Run ``transform(params, *args) -> (new_params, config_changes)`` as one compiled program
  (a conversion is hundreds of small array ops; eager dispatch would dominate). The config
  changes are plain Python, computed from shapes and structure while tracing."""
  box = {}

  def traced(p):
    new_params, changes = transform(p, *args)
    box["changes"] = changes
    return new_params

  new_params = jax.jit(traced)(params)
  return new_params, box["changes"]


def head_weight(params, cfg: ModelConfig):
  """The output projection ``[d, vocab]`` (the transposed embedding table when tied)."""
  if cfg.tie_embeddings:
    return params["embed"]["tokens"].T
  return params["head"]["w"]


def fold_into_head(params, cfg: ModelConfig, gain_d, bias_d) -> tuple[dict, dict]:
  """Fold the final norm's ``n ⊙ gain + bias`` into an untied head. Tied embeddings are untied
  (the head keeps the original table, the embedding may then be changed freely)."""
  w = head_weight(params, cfg)
  head = {"w": w * gain_d.astype(w.dtype)[:, None]}
  changes: dict[str, object] = {"tie_embeddings": False}
  old_b = None if cfg.tie_embeddings else params["head"].get("b")
  if bias_d is not None or old_b is not None:
    b = jnp.zeros((w.shape[1],), w.dtype) if old_b is None else old_b
    if bias_d is not None:
      b = b + bias_d.astype(w.dtype) @ w
    head["b"] = b
    changes["head_bias"] = True
  return {**params, "head": head}, changes


def untie_head(params, cfg: ModelConfig) -> tuple[dict, dict]:
  """An explicit ``head`` entry (copy of the tied table) so the embedding can change alone."""
  if not cfg.tie_embeddings:
    return params, {}
  return {**params, "head": {"w": params["embed"]["tokens"].T}}, {"tie_embeddings": False}


def fold_embedding_scale(params, cfg: ModelConfig) -> tuple[dict, dict]:
  """Fold ``scale_embeddings`` (sqrt(d_model), which changes with d_model) into the table (a tied
  head is untied first: it reads the unscaled table)."""
  if not cfg.scale_embeddings:
    return params, {}
  params, changes = untie_head(params, cfg)
  embed = dict(params["embed"])
  embed["tokens"] = embed["tokens"] * jnp.asarray(math.sqrt(cfg.d_model), embed["tokens"].dtype)
  return {**params, "embed": embed}, {**changes, "scale_embeddings": False}
