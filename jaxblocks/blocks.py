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
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxblocks import mlp as mlp_lib
from jaxblocks import norms
from jaxblocks import sharding
from jaxblocks.attention import base as attn_base
from jaxblocks.context import Context
from jaxblocks.errors import check_choice

if TYPE_CHECKING:
  from jaxblocks.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """topology: a name in ``TOPOLOGIES`` (``pre``: Pre-LN, ``parallel``: GPT-J/NeoX parallel
  attention and MLP). parallel_shared_norm: one norm feeds both parallel branches (GPT-J) instead
  of one norm each (GPT-NeoX)."""

  topology: str = "pre"
  parallel_shared_norm: bool = False

  def validate(self, prefix: str = "block") -> None:
    check_choice(f"{prefix}.topology", self.topology, sorted(TOPOLOGIES))


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


# ----------------------------------------------------------------------------- Pre-LN


def _pre_specs(cfg, attn_kind):
  return {
      "attn_norm": norms.specs(cfg.d_model, cfg.norm),
      "attn": attention_specs(cfg, attn_kind),
      "mlp_norm": norms.specs(cfg.d_model, cfg.norm),
      "mlp": mlp_specs(cfg),
  }


def _pre_apply(params, x, cfg, ctx, attn_kind, cache):
  a, new_cache = attention_sublayer(params["attn"], norms.apply(params["attn_norm"], x, cfg.norm),
                                    cfg, ctx, attn_kind, cache)
  x = x + a
  x = x + mlp_sublayer(params["mlp"], norms.apply(params["mlp_norm"], x, cfg.norm), cfg)
  return x, new_cache


register("pre", _pre_specs, _pre_apply)


# ----------------------------------------------------------------------------- parallel


def _parallel_specs(cfg, attn_kind):
  s = {
      "attn_norm": norms.specs(cfg.d_model, cfg.norm),
      "attn": attention_specs(cfg, attn_kind),
      "mlp": mlp_specs(cfg),
  }
  if not cfg.block.parallel_shared_norm:
    s["mlp_norm"] = norms.specs(cfg.d_model, cfg.norm)
  return s


def _parallel_apply(params, x, cfg, ctx, attn_kind, cache):
  h_attn = norms.apply(params["attn_norm"], x, cfg.norm)
  h_mlp = h_attn if cfg.block.parallel_shared_norm else norms.apply(params["mlp_norm"], x, cfg.norm)
  a, new_cache = attention_sublayer(params["attn"], h_attn, cfg, ctx, attn_kind, cache)
  return x + a + mlp_sublayer(params["mlp"], h_mlp, cfg), new_cache


register("parallel", _parallel_specs, _parallel_apply)
