"""Normalization layers as pure functions plus their parameter specs.

Every norm is registered in :data:`NORMS` under its config name with two functions:

* ``specs(d, cfg) -> tree of ParamSpec`` (may be ``{}`` for weightless norms),
* ``apply(params, x, cfg) -> y`` normalising over the last axis.

Statistics are always computed in float32; the output has the input's dtype. Adding a norm is
one ``specs`` function, one ``apply`` function and a :func:`register` call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxblocks import params as P
from jaxblocks.errors import ConfigError, check_choice, check_positive


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """Which normalization to use and its options.

  kind: a name registered in ``NORMS`` (``rmsnorm``, ``layernorm``, ``none`` ...).
  eps: added to the variance / mean square.
  scale: learn a per-channel gain.
  bias: learn a per-channel bias (LayerNorm-style).
  scale_offset: the gain used is ``scale_offset + w`` (Gemma stores ``w`` with offset 1 and
    initialises ``w`` at 0); 0 means the usual ``w`` initialised at 1.
  """

  kind: str = "rmsnorm"
  eps: float = 1e-6
  scale: bool = True
  bias: bool = False
  scale_offset: float = 0.0
  impl: str = "xla"

  def validate(self, prefix: str = "norm") -> None:
    check_choice(f"{prefix}.kind", self.kind, sorted(NORMS))
    check_positive(f"{prefix}.eps", self.eps, allow_zero=True)
    check_choice(f"{prefix}.impl", self.impl, NORM_IMPLS)
    if self.bias and not NORMS[self.kind].supports_bias:
      raise ConfigError(f"{prefix}.bias", f"norm kind '{self.kind}' has no bias")


@dataclasses.dataclass(frozen=True)
class NormDef:
  specs: Callable[[int, NormConfig], Any]
  apply: Callable[[Any, jax.Array, NormConfig], jax.Array]
  supports_bias: bool = True


NORMS: dict[str, NormDef] = {}
NORM_IMPLS = ("xla", "auto", "pallas")


def register(name: str, specs, apply, supports_bias: bool = True) -> None:
  NORMS[name] = NormDef(specs, apply, supports_bias)


def specs(d: int, cfg: NormConfig):
  return NORMS[cfg.kind].specs(d, cfg)


def apply(params, x: jax.Array, cfg: NormConfig) -> jax.Array:
  """Normalise ``x`` over its last axis with the norm named by ``cfg.kind``."""
  return NORMS[cfg.kind].apply(params, x, cfg)


# ----------------------------------------------------------------------------- shared pieces


def affine_specs(d: int, cfg: NormConfig):
  out = {}
  if cfg.scale:
    out["scale"] = P.ParamSpec((d,), ("norm",), P.constant(1.0 - cfg.scale_offset))
  if cfg.bias:
    out["bias"] = P.ParamSpec((d,), ("norm",), P.zeros)
  return out


def apply_affine(params, y32: jax.Array, cfg: NormConfig) -> jax.Array:
  """Per-channel gain and bias applied to a float32 normalised tensor."""
  if "scale" in params:
    y32 = y32 * (cfg.scale_offset + params["scale"].astype(jnp.float32))
  if "bias" in params:
    y32 = y32 + params["bias"].astype(jnp.float32)
  return y32


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """``x / sqrt(mean(x²) + eps)`` in float32 (returns float32)."""
  x32 = x.astype(jnp.float32)
  ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(ms + eps)


def layer_normalize(x: jax.Array, eps: float) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` in float32 (returns float32)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + eps)


# ----------------------------------------------------------------------------- the norms


def _kernel_norm(params, x, cfg, kind):
  from jaxblocks.kernels.norm import api as norm_kernels  # the kernels build on this module
  return norm_kernels.norm(x, params.get("scale"), params.get("bias"), kind=kind, eps=cfg.eps,
                           scale_offset=cfg.scale_offset, impl=cfg.impl)


def _rmsnorm(params, x, cfg):
  if cfg.impl != "xla":
    return _kernel_norm(params, x, cfg, "rms")
  return apply_affine(params, rms_normalize(x, cfg.eps), cfg).astype(x.dtype)


def _layernorm(params, x, cfg):
  if cfg.impl != "xla":
    return _kernel_norm(params, x, cfg, "layer")
  return apply_affine(params, layer_normalize(x, cfg.eps), cfg).astype(x.dtype)


def _none_specs(d, cfg):
  del d, cfg
  return {}


def _none(params, x, cfg):
  del params, cfg
  return x


register("rmsnorm", affine_specs, _rmsnorm)
register("layernorm", affine_specs, _layernorm)
register("none", _none_specs, _none, supports_bias=False)


def rmsnorm(x: jax.Array, scale: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
  """Functional RMSNorm over the last axis (convenience for use outside configs)."""
  y = rms_normalize(x, eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  return y.astype(x.dtype)


def layernorm(x: jax.Array, scale: jax.Array | None = None, bias: jax.Array | None = None,
              eps: float = 1e-5) -> jax.Array:
  """Functional LayerNorm over the last axis (convenience for use outside configs)."""
  y = layer_normalize(x, eps)
  if scale is not None:
    y = y * scale.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(x.dtype)
