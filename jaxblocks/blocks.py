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
from jaxblocks.errors import ConfigError, check_choice

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
  """

  topology: str = "pre"
  parallel_shared_norm: bool = False
  mix_alpha: float = 0.25
  ln_scaling: bool = False
  embed_norm: bool = False

  def validate(self, prefix: str = "block") -> None:
    check_choice(f"{prefix}.topology", self.topology, sorted(TOPOLOGIES))
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


def attention_sublayer(params, h_btd, cfg: "ModelConfig", ctx: Context, attn_kind: str, cache):
  y, new_cache = attn_base.get(attn_kind).apply(params, h_btd, cfg.attention, ctx, cache)
  y = checkpoint_name(y, "attn_out")
  return sharding.constrain(y, ("batch", "seq", "embed")), new_cache


def mlp_sublayer(params, h_btd, cfg: "ModelConfig"):
  y = checkpoint_name(mlp_lib.apply(params, h_btd, cfg.mlp), "mlp_out")
  return sharding.constrain(y, ("batch", "seq", "embed"))


# ----------------------------------------------------------------------------- norms in blocks


def norm_slots(layer_specs) -> list[str]:
  """The norm slots of one layer's params: top-level keys ending in ``_norm`` (a convention every
  topology follows, so the model can build the running-statistics state of stateful norms)."""
  return [k for k in layer_specs if k.endswith("_norm")]


def norm_specs(cfg: "ModelConfig", role: str):
  return norms.specs(cfg.d_model, cfg.norm, role)


def _norm_call(params, slot, x, cfg: "ModelConfig", ctx: Context):
  """``(y, new_state)``; new_state None for stateless norms."""
  if not cfg.norm.is_stateful:
    return norms.apply(params[slot], x, cfg.norm), None
  states = ctx.extras.get("norm_state")
  if states is None:
    raise ValueError(f"norm kind '{cfg.norm.kind}' keeps running statistics: run the model with "
                     "its state (model.apply_train for training, model.apply(..., state=) for "
                     "evaluation)")
  return norms.apply_stateful(params[slot], states[slot], x, cfg.norm, ctx.extras["norm_context"])


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


def _pre_apply(params, x, cfg, ctx, attn_kind, cache):
  h = ln_scale(block_norm(params, "attn_norm", x, cfg, ctx), cfg, ctx)
  a, new_cache = attention_sublayer(params["attn"], h, cfg, ctx, attn_kind, cache)
  x = x + a
  h = ln_scale(block_norm(params, "mlp_norm", x, cfg, ctx), cfg, ctx)
  x = x + mlp_sublayer(params["mlp"], h, cfg)
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
  h_attn = ln_scale(block_norm(params, "attn_norm", x, cfg, ctx), cfg, ctx)
  h_mlp = h_attn if cfg.block.parallel_shared_norm else ln_scale(
      block_norm(params, "mlp_norm", x, cfg, ctx), cfg, ctx)
  a, new_cache = attention_sublayer(params["attn"], h_attn, cfg, ctx, attn_kind, cache)
  return x + a + mlp_sublayer(params["mlp"], h_mlp, cfg), new_cache


register("parallel", _parallel_specs, _parallel_apply)
