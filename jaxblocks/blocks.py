"""Residual topologies: how a layer wires its attention and MLP sublayers and norms.

Each topology is registered in :data:`TOPOLOGIES` with

* ``specs(cfg, attn_kind) -> tree of ParamSpec`` for one layer,
* ``apply(params, x_btd, cfg, ctx, attn_kind, cache) -> (x_btd, new_cache)``.

``cfg`` is the whole :class:`jaxblocks.config.ModelConfig` (the block reads its ``norm``,
``attention``, ``mlp`` and ``block`` sub-configs); ``ctx.layer_idx`` is available (traced inside
``lax.scan``) for depth-dependent topologies. The model never needs to change when a topology
is added here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxblocks import mlp as mlp_lib
from jaxblocks import norms
from jaxblocks import sharding
from jaxblocks.attention import base as attn_base
from jaxblocks.context import Context
from jaxblocks.errors import ConfigError, check_choice, check_int

if TYPE_CHECKING:
  from jaxblocks.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """How a layer wires its sublayers and norms.

  topology: a name in ``TOPOLOGIES``:
    ``pre`` (Pre-LN: ``x + F(N(x))``), ``post`` (Post-LN: ``N(x + F(x))``),
    ``peri`` (Peri-LN, a.k.a. sandwich norm as in Gemma 2/3: ``x + N_out(F(N_in(x)))``),
    ``olmo2`` (output-only norm, OLMo 2: ``x + N_out(F(x))``),
    ``mix`` (Mix-LN: the first ``floor(mix_alpha · n_layers)`` layers Post-LN, the rest Pre-LN),
    ``parallel`` (GPT-J/NeoX: ``x + Attn(N(x)) + MLP(N'(x))``).
  parallel_shared_norm: one norm feeds both parallel branches (GPT-J) instead of one norm each
    (GPT-NeoX).
  mix_alpha: fraction of Post-LN layers of ``mix`` (Mix-LN default 0.25).
  ln_scaling: LayerNorm Scaling (Curse of Depth): multiply the pre-norm outputs of layer ``l``
    (1-based) by ``1/sqrt(l)``; for the ``pre`` and ``parallel`` topologies (the final norm is
    never scaled).
  embed_norm: a norm right after the embedding (Peri-LN's optional embedding norm; any topology).

  Simplified and residual-free blocks (see the sections at the end of this module):
    ``sas`` / ``sas_p`` (He & Hofmann's simplified blocks; need attention kind ``shaped``),
    ``skipless`` / ``skipless_merged`` (no residual connections), ``attnres`` /
    ``attnres_block`` (Attention Residuals: every sublayer reads a learned mix of earlier outputs).
  sas_beta_ff / sas_beta_sa: initial values of the trainable MLP / attention branch gains of the
    ``sas`` and ``sas_p`` topologies. sas_first_layer_value: layer 0 of a SAS/SAS-P model keeps a
    full value matrix. attnres_block_size: sublayers per block of ``attnres_block``.
  """

  topology: str = "pre"
  parallel_shared_norm: bool = False
  mix_alpha: float = 0.25
  ln_scaling: bool = False
  embed_norm: bool = False
  sas_beta_ff: float = 0.1
  sas_beta_sa: float = 1.0
  sas_first_layer_value: bool = False
  attnres_block_size: int = 4

  def validate(self, prefix: str = "block") -> None:
    check_choice(f"{prefix}.topology", self.topology, sorted(TOPOLOGIES))
    check_int(f"{prefix}.attnres_block_size", self.attnres_block_size, minimum=1)
    if not (isinstance(self.mix_alpha, (int, float)) and 0.0 <= self.mix_alpha <= 1.0):
      raise ConfigError(f"{prefix}.mix_alpha", f"must be in [0, 1], got {self.mix_alpha!r}")
    if self.ln_scaling and self.topology not in LN_SCALING_TOPOLOGIES:
      raise ConfigError(f"{prefix}.ln_scaling", f"LayerNorm Scaling modifies pre-norm outputs; "
                        f"topology must be one of {LN_SCALING_TOPOLOGIES}, got "
                        f"'{self.topology}'")

  def n_post_layers(self, n_layers: int) -> int:
    """Number of leading Post-LN layers of the ``mix`` topology."""
    return int(math.floor(self.mix_alpha * n_layers))


LN_SCALING_TOPOLOGIES = ("pre", "parallel")


@dataclasses.dataclass(frozen=True)
class Topology:
  specs: Callable[..., Any]
  apply: Callable[..., Any]


TOPOLOGIES: dict[str, Topology] = {}


def register(name: str, specs, apply) -> None:
  TOPOLOGIES[name] = Topology(specs, apply)


def specs(cfg: "ModelConfig", attn_kind: str):
  return TOPOLOGIES[cfg.block.topology].specs(cfg, attn_kind)


def apply(params, x_btd, cfg: "ModelConfig", ctx: Context, attn_kind: str, cache=None):
  """Run one layer; returns ``(x_btd, new_cache)``."""
  return TOPOLOGIES[cfg.block.topology].apply(params, x_btd, cfg, ctx, attn_kind, cache)


# ----------------------------------------------------------------------------- sublayers


def attention_specs(cfg: "ModelConfig", attn_kind: str):
  return attn_base.get(attn_kind).specs(cfg.d_model, cfg.attention, cfg.init_std)


def mlp_specs(cfg: "ModelConfig"):
  return mlp_lib.specs(cfg.d_model, cfg.mlp, cfg.init_std)


def attention_sublayer(params, h_btd, cfg: "ModelConfig", ctx: Context, attn_kind: str, cache,
                       input_scale_bt1=None):
  """``input_scale_bt1``: deferred normalisation of ``h`` (see ``NormConfig.deferred``)."""
  if input_scale_bt1 is not None:
    ctx = ctx.replace(extras={**ctx.extras, "input_scale": input_scale_bt1})
  y, new_cache = attn_base.get(attn_kind).apply(params, h_btd, cfg.attention, ctx, cache)
  y = checkpoint_name(y, "attn_out")
  return sharding.constrain(y, ("batch", "seq", "embed")), new_cache


def mlp_sublayer(params, h_btd, cfg: "ModelConfig", input_scale_bt1=None):
  y = checkpoint_name(mlp_lib.apply(params, h_btd, cfg.mlp, input_scale_bt1), "mlp_out")
  return sharding.constrain(y, ("batch", "seq", "embed"))


# ----------------------------------------------------------------------------- norms in blocks


def norm_slots(layer_specs) -> list[str]:
  """The norm slots of one layer's params: top-level keys ending in ``_norm`` (a convention every
  topology follows, so the model can build the running-statistics state of stateful norms)."""
  return [k for k in layer_specs if k.endswith("_norm")]


def norm_specs(cfg: "ModelConfig", role: str):
  return norms.specs(cfg.d_model, cfg.norm, role)


def slot_norm_config(cfg: "ModelConfig", slot: str) -> norms.NormConfig:
  """The norm config of layer slot ``slot`` (``attn_out_norm`` is in role ``attn_out``, ...)."""
  return cfg.norm.for_role(slot.removesuffix("_norm"))


def _norm_call(params, slot, x, cfg: "ModelConfig", ctx: Context):
  """``(y, new_state)``; new_state None for stateless norms."""
  if not cfg.norm.is_stateful:
    return norms.apply(params[slot], x, slot_norm_config(cfg, slot)), None
  states = ctx.extras.get("norm_state")
  if states is None:
    raise ValueError(f"norm kind '{cfg.norm.kind}' keeps running statistics: run the model with "
                     "its state (model.apply_train for training, model.apply(..., state=) for "
                     "evaluation)")
  return norms.apply_stateful(params[slot], states[slot], x, slot_norm_config(cfg, slot),
                             ctx.extras["norm_context"])


def block_norm(params, slot: str, x, cfg: "ModelConfig", ctx: Context):
  """Apply the layer's norm ``params[slot]``; stateful norms read their running statistics from
  ``ctx.extras['norm_state'][slot]`` and write the update to ``ctx.extras['norm_state_out']``
  (a dict the model creates for every layer call and reads right after it)."""
  y, new_state = _norm_call(params, slot, x, cfg, ctx)
  if new_state is not None:
    ctx.extras["norm_state_out"][slot] = new_state
  return y


def ln_scale(h, cfg: "ModelConfig", ctx: Context):
  """LayerNorm Scaling: ``h / sqrt(l)`` with ``l = layer_idx + 1`` (traced under scan)."""
  if not cfg.block.ln_scaling:
    return h
  factor = jax.lax.rsqrt(jnp.asarray(ctx.layer_idx, jnp.float32) + 1.0)
  return h * factor.astype(h.dtype)


# ----------------------------------------------------------------------------- Pre-LN


def _pre_specs(cfg, attn_kind):
  return {
      "attn_norm": norm_specs(cfg, "attn"),
      "attn": attention_specs(cfg, attn_kind),
      "mlp_norm": norm_specs(cfg, "mlp"),
      "mlp": mlp_specs(cfg),
  }


def input_norm(params, slot: str, x, cfg: "ModelConfig", ctx: Context):
  """A sublayer-input norm (with LayerNorm Scaling): ``(h, input_scale)``. With deferred
  normalisation ``h`` is the raw (scaled) stream and ``input_scale = 1/RMS(x)`` is applied by the
  sublayer after its projections; otherwise ``input_scale`` is None."""
  if cfg.norm.deferred:
    return ln_scale(x, cfg, ctx), norms.inv_rms(x, cfg.norm.eps)
  return ln_scale(block_norm(params, slot, x, cfg, ctx), cfg, ctx), None


def _pre_apply(params, x, cfg, ctx, attn_kind, cache):
  h, s = input_norm(params, "attn_norm", x, cfg, ctx)
  a, new_cache = attention_sublayer(params["attn"], h, cfg, ctx, attn_kind, cache, s)
  x = x + a
  h, s = input_norm(params, "mlp_norm", x, cfg, ctx)
  x = x + mlp_sublayer(params["mlp"], h, cfg, s)
  return x, new_cache


register("pre", _pre_specs, _pre_apply)


# ----------------------------------------------------------------------------- Post-LN


def _post_specs(cfg, attn_kind):
  return {
      "attn": attention_specs(cfg, attn_kind),
      "attn_norm": norm_specs(cfg, "attn_post"),
      "mlp": mlp_specs(cfg),
      "mlp_norm": norm_specs(cfg, "mlp_post"),
  }


def _post_apply(params, x, cfg, ctx, attn_kind, cache):
  a, new_cache = attention_sublayer(params["attn"], x, cfg, ctx, attn_kind, cache)
  x = block_norm(params, "attn_norm", x + a, cfg, ctx)
  x = block_norm(params, "mlp_norm", x + mlp_sublayer(params["mlp"], x, cfg), cfg, ctx)
  return x, new_cache


register("post", _post_specs, _post_apply)


# ----------------------------------------------------------------------------- Peri-LN


def _peri_specs(cfg, attn_kind):
  return {
      "attn_norm": norm_specs(cfg, "attn"),
      "attn": attention_specs(cfg, attn_kind),
      "attn_out_norm": norm_specs(cfg, "attn_out"),
      "mlp_norm": norm_specs(cfg, "mlp"),
      "mlp": mlp_specs(cfg),
      "mlp_out_norm": norm_specs(cfg, "mlp_out"),
  }


def _peri_apply(params, x, cfg, ctx, attn_kind, cache):
  a, new_cache = attention_sublayer(params["attn"], block_norm(params, "attn_norm", x, cfg, ctx),
                                    cfg, ctx, attn_kind, cache)
  x = x + block_norm(params, "attn_out_norm", a, cfg, ctx)
  m = mlp_sublayer(params["mlp"], block_norm(params, "mlp_norm", x, cfg, ctx), cfg)
  x = x + block_norm(params, "mlp_out_norm", m, cfg, ctx)
  return x, new_cache


register("peri", _peri_specs, _peri_apply)


# ----------------------------------------------------------------------------- OLMo 2


def _olmo2_specs(cfg, attn_kind):
  return {
      "attn": attention_specs(cfg, attn_kind),
      "attn_out_norm": norm_specs(cfg, "attn_out"),
      "mlp": mlp_specs(cfg),
      "mlp_out_norm": norm_specs(cfg, "mlp_out"),
  }


def _olmo2_apply(params, x, cfg, ctx, attn_kind, cache):
  a, new_cache = attention_sublayer(params["attn"], x, cfg, ctx, attn_kind, cache)
  x = x + block_norm(params, "attn_out_norm", a, cfg, ctx)
  x = x + block_norm(params, "mlp_out_norm", mlp_sublayer(params["mlp"], x, cfg), cfg, ctx)
  return x, new_cache


register("olmo2", _olmo2_specs, _olmo2_apply)


# ----------------------------------------------------------------------------- Mix-LN


def _mix_specs(cfg, attn_kind):
  return _pre_specs(cfg, attn_kind)


def _mix_residual(params, slot, x, branch, cfg, ctx, is_post):
  """One sublayer of Mix-LN. With a traced layer index both norms run (cheap, elementwise) and
  ``where`` selects; the sublayer itself runs once."""
  if isinstance(is_post, bool):  # static layer index: plain Python control flow
    if is_post:
      y, aux = branch(x)
      return block_norm(params, slot, x + y, cfg, ctx), aux
    y, aux = branch(block_norm(params, slot, x, cfg, ctx))
    return x + y, aux
  h_pre, state_pre = _norm_call(params, slot, x, cfg, ctx)
  y, aux = branch(jnp.where(is_post, x, h_pre))
  y = x + y
  out_post, state_post = _norm_call(params, slot, y, cfg, ctx)
  if state_pre is not None:
    ctx.extras["norm_state_out"][slot] = jax.tree.map(
        lambda a, b: jnp.where(is_post, a, b), state_post, state_pre)
  return jnp.where(is_post, out_post, y), aux


def _mix_apply(params, x, cfg, ctx, attn_kind, cache):
  n_post = cfg.block.n_post_layers(cfg.n_layers)
  idx = ctx.layer_idx
  is_post = bool(idx < n_post) if isinstance(idx, int) else (idx < n_post)

  def attn_branch(h):
    return attention_sublayer(params["attn"], h, cfg, ctx, attn_kind, cache)

  def mlp_branch(h):
    return mlp_sublayer(params["mlp"], h, cfg), None

  x, new_cache = _mix_residual(params, "attn_norm", x, attn_branch, cfg, ctx, is_post)
  x, _ = _mix_residual(params, "mlp_norm", x, mlp_branch, cfg, ctx, is_post)
  return x, new_cache


register("mix", _mix_specs, _mix_apply)


# ----------------------------------------------------------------------------- parallel


def _parallel_specs(cfg, attn_kind):
  s = {
      "attn_norm": norm_specs(cfg, "attn"),
      "attn": attention_specs(cfg, attn_kind),
      "mlp": mlp_specs(cfg),
  }
  if not cfg.block.parallel_shared_norm:
    s["mlp_norm"] = norm_specs(cfg, "mlp")
  return s


def _parallel_apply(params, x, cfg, ctx, attn_kind, cache):
  h_attn, s_attn = input_norm(params, "attn_norm", x, cfg, ctx)
  h_mlp, s_mlp = (h_attn, s_attn) if cfg.block.parallel_shared_norm else input_norm(
      params, "mlp_norm", x, cfg, ctx)
  a, new_cache = attention_sublayer(params["attn"], h_attn, cfg, ctx, attn_kind, cache, s_attn)
  return x + a + mlp_sublayer(params["mlp"], h_mlp, cfg, s_mlp), new_cache


register("parallel", _parallel_specs, _parallel_apply)


# ----------------------------------------------------------------------------- model-wide hooks
#
# Most topologies carry one d-wide residual stream from layer to layer. A topology may instead
# register :class:`StreamHooks`: model-wide parameters (stored as ``params["topology"]`` and
# handed to every layer as ``ctx.extras``), a function turning the embedding into the carried
# state, and one turning the final state back into ``[batch, time, d]`` before the head. The
# layer scan carries whatever pytree ``init`` returns; blocks receive and return it.


@dataclasses.dataclass(frozen=True)
class StreamHooks:
  model_specs: Callable[["ModelConfig"], Any]
  init: Callable[[Any, jax.Array, "ModelConfig"], Any]
  readout: Callable[[Any, Any, "ModelConfig"], jax.Array]


STREAMS: dict[str, StreamHooks] = {}


def stream_hooks(cfg: "ModelConfig") -> StreamHooks | None:
  """The model-wide hooks of ``cfg``'s topology, or None for a plain residual stream."""
  return STREAMS.get(cfg.block.topology)


def _identity_stream(top_params, x, cfg):
  del top_params, cfg
  return x


def _scalar(value: float):
  from jaxblocks import params as P
  return P.ParamSpec((), (), P.constant(value))


# ----------------------------------------------------------------------------- SAS / SAS-P
#
# Simplified Transformer Blocks (He & Hofmann, ICLR 2024) with shaped attention (attention kind
# ``shaped``): ``sas``   X̂ = Attn(Norm X) (no attention skip), X_out = X̂ + β_FF·MLP(Norm X̂);
#                  ``sas_p`` X_out = β_SA·Attn(Norm X) + β_FF·MLP(Norm X) (no skips at all).
# β_FF (init ``sas_beta_ff`` = 0.1) and β_SA (init ``sas_beta_sa`` = 1) are trainable; α_FF = 1.
# Norms follow ``model.norm`` (kind ``none`` gives the norm-free variants).


def _check_shaped(cfg, attn_kind):
  if attn_kind != "shaped":
    raise ConfigError("model.attention_pattern", f"topology '{cfg.block.topology}' needs shaped "
                      f"attention (attention kind 'shaped'), got '{attn_kind}'")


def _sas_specs(cfg, attn_kind):
  _check_shaped(cfg, attn_kind)
  return {
      "attn_norm": norm_specs(cfg, "attn"),
      "attn": attention_specs(cfg, attn_kind),
      "mlp_norm": norm_specs(cfg, "mlp"),
      "mlp": mlp_specs(cfg),
      "beta_ff": _scalar(cfg.block.sas_beta_ff),
  }


def _sas_apply(params, x, cfg, ctx, attn_kind, cache):
  x_hat, new_cache = attention_sublayer(
      params["attn"], block_norm(params, "attn_norm", x, cfg, ctx), cfg, ctx, attn_kind, cache)
  m = mlp_sublayer(params["mlp"], block_norm(params, "mlp_norm", x_hat, cfg, ctx), cfg)
  return x_hat + params["beta_ff"].astype(m.dtype) * m, new_cache


def _sas_p_specs(cfg, attn_kind):
  _check_shaped(cfg, attn_kind)
  return {
      "shared_norm": norm_specs(cfg, "attn"),
      "attn": attention_specs(cfg, attn_kind),
      "mlp": mlp_specs(cfg),
      "beta_sa": _scalar(cfg.block.sas_beta_sa),
      "beta_ff": _scalar(cfg.block.sas_beta_ff),
  }


def _sas_p_apply(params, x, cfg, ctx, attn_kind, cache):
  h = block_norm(params, "shared_norm", x, cfg, ctx)
  a, new_cache = attention_sublayer(params["attn"], h, cfg, ctx, attn_kind, cache)
  m = mlp_sublayer(params["mlp"], h, cfg)
  return params["beta_sa"].astype(a.dtype) * a + params["beta_ff"].astype(m.dtype) * m, new_cache


def _sas_model_specs(cfg):
  if not cfg.block.sas_first_layer_value:
    return {}
  from jaxblocks.attention import shaped
  return {shaped.FIRST_LAYER_VALUE: shaped.first_layer_value_spec(cfg.d_model, cfg.attention,
                                                                  cfg.init_std)}


register("sas", _sas_specs, _sas_apply)
register("sas_p", _sas_p_specs, _sas_p_apply)
STREAMS["sas"] = StreamHooks(_sas_model_specs, _identity_stream, _identity_stream)
STREAMS["sas_p"] = StreamHooks(_sas_model_specs, _identity_stream, _identity_stream)


# ----------------------------------------------------------------------------- skipless
#
# ``skipless``: X ← MLP(Norm(Attn(Norm X))) with no residual connections (Graef's skipless
# transformer; use norm kind ``none`` for the norm-free model). ``skipless_merged`` is what
# :mod:`jaxblocks.tricks.skipless` turns a norm-free skipless softmax model into: no query and no
# output projection (queries are the block input split into heads; P is merged into the MLP's
# input matrices), keys/values from W_Q⁻¹·W_K and W_Q⁻¹·W_V.


def _skipless_specs(cfg, attn_kind):
  return _pre_specs(cfg, attn_kind)  # the same sublayers and norms, wired without skips


def _skipless_apply(params, x, cfg, ctx, attn_kind, cache):
  a, new_cache = attention_sublayer(params["attn"], block_norm(params, "attn_norm", x, cfg, ctx),
                                    cfg, ctx, attn_kind, cache)
  return mlp_sublayer(params["mlp"], block_norm(params, "mlp_norm", a, cfg, ctx), cfg), new_cache


def _skipless_merged_specs(cfg, attn_kind):
  from jaxblocks.attention import softmax
  if attn_kind != "softmax":
    raise ConfigError("model.attention_pattern", "topology 'skipless_merged' supports attention "
                      f"kind 'softmax' only, got '{attn_kind}'")
  n, h = cfg.attention.n_heads, cfg.attention.dim(cfg.d_model)
  if n * h != cfg.d_model:
    raise ConfigError("model.attention.head_dim", "topology 'skipless_merged' needs n_heads * "
                      f"head_dim == d_model={cfg.d_model}, got {n} * {h}")
  full = softmax.specs(cfg.d_model, cfg.attention, cfg.init_std)
  attn = {k: v for k, v in full.items() if k not in ("wq", "bq", "wo", "bo")}
  return {"attn": attn, "mlp": mlp_specs(cfg)}


def _skipless_merged_apply(params, x, cfg, ctx, attn_kind, cache):
  from jaxblocks.attention import softmax
  del attn_kind
  b, t, d = x.shape
  acfg = cfg.attention
  p = params["attn"]
  q = x.reshape(b, t, acfg.n_heads, acfg.dim(d))
  k = jnp.einsum("btd,dkh->btkh", x, p["wk"])
  v = jnp.einsum("btd,dkh->btkh", x, p["wv"])
  if "bk" in p:
    k, v = k + p["bk"], v + p["bv"]
  if acfg.qk_norm != "none":
    q = softmax._qk_normalize(q, p["q_norm"], acfg.qk_norm, acfg.qk_norm_eps, acfg.qk_norm_offset)
    k = softmax._qk_normalize(k, p["k_norm"], acfg.qk_norm, acfg.qk_norm_eps, acfg.qk_norm_offset)
  o, new_cache = softmax.attend_with_cache(q, k, v, acfg, ctx, cache)
  return mlp_sublayer(params["mlp"], o.reshape(b, t, d), cfg), new_cache


register("skipless", _skipless_specs, _skipless_apply)
register("skipless_merged", _skipless_merged_specs, _skipless_merged_apply)


# ----------------------------------------------------------------------------- Attention Residuals
#
# Attention Residuals (Kimi, 2026): the input of every sublayer is a softmax mix of earlier
# sources, ``h = Σ_i softmax_i(w·RMSNorm(v_i))·v_i``, with a zero-initialised pseudo-query ``w``
# per sublayer (a uniform average at init) and weightless RMSNorm keys. Sources are the embedding
# and the sublayer outputs. ``attnres`` (full) keeps every source; ``attnres_block`` sums the
# outputs of each block of ``attnres_block_size`` consecutive sublayers and attends over the
# completed block sums plus the running partial sum (memory O(n_blocks·d) per token).
#
# The carried stream is ``{"sources": [n_sources, batch, time, d]}``, slot 0 the embedding and
# slot k the sum of block k; which slots are live follows from the (traced) layer index, so the
# stacked scan carries a fixed-size buffer. A final pseudo-query mixes all slots before the head.


def attnres_n_sources(cfg: "ModelConfig") -> int:
  """Slots of the Attention-Residuals buffer: embedding + one per block of sublayers."""
  size = _attnres_block_size(cfg)
  return 1 + -(-2 * cfg.n_layers // size)


def _attnres_block_size(cfg) -> int:
  return 1 if cfg.block.topology == "attnres" else cfg.block.attnres_block_size


def attnres_mix(query_d, sources_sbtd, n_valid, eps: float = 1e-6):
  """``Σ_s softmax_s(query·RMSNorm(v_s))·v_s`` over the first ``n_valid`` slots (float32 mixing
  weights). ``n_valid`` may be traced."""
  keys = norms.rms_normalize(sources_sbtd, eps)
  logits = jnp.einsum("sbtd,d->sbt", keys, query_d.astype(jnp.float32))
  live = (jnp.arange(sources_sbtd.shape[0]) < n_valid)[:, None, None]
  weights = jax.nn.softmax(jnp.where(live, logits, -jnp.inf), axis=0)
  out = jnp.einsum("sbt,sbtd->btd", weights, sources_sbtd.astype(jnp.float32))
  return out.astype(sources_sbtd.dtype)


def _attnres_specs(cfg, attn_kind):
  from jaxblocks import params as P
  s = _pre_specs(cfg, attn_kind)
  s["attn_query"] = P.ParamSpec((cfg.d_model,), ("embed",), P.zeros)
  s["mlp_query"] = P.ParamSpec((cfg.d_model,), ("embed",), P.zeros)
  return s


def _attnres_sublayer(stream, query, fn, sublayer_idx, size):
  sources = stream["sources"]
  slot = sublayer_idx // size + 1
  n_valid = slot + (sublayer_idx % size > 0)
  out, extra = fn(attnres_mix(query, sources, n_valid))
  current = jax.lax.dynamic_index_in_dim(sources, slot, 0, keepdims=False)
  sources = jax.lax.dynamic_update_index_in_dim(sources, current + out.astype(sources.dtype),
                                                slot, 0)
  return {"sources": sources}, extra


def _attnres_apply(params, stream, cfg, ctx, attn_kind, cache):
  size = _attnres_block_size(cfg)
  first = 2 * ctx.layer_idx

  def attn(h):
    return attention_sublayer(params["attn"], block_norm(params, "attn_norm", h, cfg, ctx), cfg,
                              ctx, attn_kind, cache)

  def mlp(h):
    return mlp_sublayer(params["mlp"], block_norm(params, "mlp_norm", h, cfg, ctx), cfg), None

  stream, new_cache = _attnres_sublayer(stream, params["attn_query"], attn, first, size)
  stream, _ = _attnres_sublayer(stream, params["mlp_query"], mlp, first + 1, size)
  return stream, new_cache


def _attnres_model_specs(cfg):
  from jaxblocks import params as P
  return {"attnres_out_query": P.ParamSpec((cfg.d_model,), ("embed",), P.zeros)}


def _attnres_init(top_params, x_btd, cfg):
  del top_params
  sources = jnp.zeros((attnres_n_sources(cfg), *x_btd.shape), x_btd.dtype)
  return {"sources": sources.at[0].set(x_btd)}


def _attnres_readout(top_params, stream, cfg):
  sources = stream["sources"]
  return attnres_mix(top_params["attnres_out_query"], sources, sources.shape[0])


for _name in ("attnres", "attnres_block"):
  register(_name, _attnres_specs, _attnres_apply)
  STREAMS[_name] = StreamHooks(_attnres_model_specs, _attnres_init, _attnres_readout)
