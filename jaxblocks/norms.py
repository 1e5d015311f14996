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
from jaxblocks.errors import ConfigError, check_choice, check_int, check_positive


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """Which normalization to use and its options.

  kind: a name registered in ``NORMS``: ``layernorm``, ``rmsnorm``, ``crmsnorm`` (RMSNorm of a
    zero-mean vector stored as its first d-1 coordinates), ``dyt`` (Dynamic Tanh), ``bhyt``
    (bounded hyperbolic tanh), ``seednorm``, ``single_scale_rmsnorm``, ``repbn``, ``prepbn``
    (progressive LayerNorm → RepBN), ``none``.
  eps: added to the variance / mean square.
  scale: learn a per-channel gain.
  bias: learn a per-channel bias (LayerNorm-style).
  scale_offset: the gain used is ``scale_offset + w`` (Gemma stores ``w`` with offset 1 and
    initialises ``w`` at 0); 0 means the usual ``w`` initialised at 1.
  out_scale / out_bias: the gain / bias of sublayer-output norms (roles ``attn_out``,
    ``mlp_out``: Peri-LN, OLMo 2); None: as ``scale`` / ``bias``. A Peri-LN model whose input
    norms had their affine folded into the projections (FlashNorm) keeps it on its output norms.
  deferred: FlashNorm's deferred normalisation for weightless RMSNorm on sublayer inputs
    (``pre``/``parallel`` topologies, softmax attention): the block projects the raw stream and
    rescales the projections by ``1/RMS(x)`` (``(x·W)/RMS(x) = (x/RMS(x))·W``), so the matmuls
    and the mean-square reduction are independent. Bias-free input projections only; see
    :func:`jaxblocks.tricks.flashnorm.defer_normalization`.
  final_kind: norm kind of the final norm before the head (None: ``kind``, except ``bhyt`` whose
    final norm is a plain ``rmsnorm`` as in the paper).
  alpha_init / alpha_init_attn (dyt): initial ``alpha`` of the non-attention (MLP, final,
    embedding) norms and of the attention-side norms. None picks the width-dependent LLM default
    of the DyT paper: d <= 1024: 1.0 / 1.0; d <= 2048: 0.5 / 1.0; larger: 0.2 / 0.8.
  embed_scale: a learnable scalar multiplying the embedding output, initialised to sqrt(d_model)
    (DyT's LLM recipe). None: on for ``dyt``, off otherwise.
  bhyt_kappa / bhyt_lambda_in / bhyt_lambda_post (bhyt): ``tanh(lambda·x / (kappa·rms(x)))``;
    ``lambda`` is a learnable scalar initialised to ``bhyt_lambda_in`` for sublayer-input norms
    and ``bhyt_lambda_post`` for sublayer-output / post-residual norms.
  momentum (repbn, prepbn): running statistics ``r ← (1 - momentum)·r + momentum·batch``.
  prepbn_warmup_steps / prepbn_decay_steps (prepbn): the LayerNorm weight ``lambda`` of
    ``lambda·LN(x) + (1 - lambda)·RepBN(x)`` is 1 for ``warmup`` steps, then decays linearly to 0
    over ``decay`` steps (0: switch at once).
  """

  kind: str = "rmsnorm"
  eps: float = 1e-6
  scale: bool = True
  bias: bool = False
  scale_offset: float = 0.0
  impl: str = "xla"
  final_kind: str | None = None
  out_scale: bool | None = None
  out_bias: bool | None = None
  deferred: bool = False
  alpha_init: float | None = None
  alpha_init_attn: float | None = None
  embed_scale: bool | None = None
  bhyt_kappa: float = 10.0
  bhyt_lambda_in: float = 2.0
  bhyt_lambda_post: float = 1.0
  momentum: float = 0.1
  prepbn_warmup_steps: int = 0
  prepbn_decay_steps: int = 1000

  def validate(self, prefix: str = "norm") -> None:
    check_choice(f"{prefix}.kind", self.kind, sorted(NORMS))
    check_positive(f"{prefix}.eps", self.eps, allow_zero=True)
    check_choice(f"{prefix}.impl", self.impl, NORM_IMPLS)
    if self.bias and not NORMS[self.kind].supports_bias:
      raise ConfigError(f"{prefix}.bias", f"norm kind '{self.kind}' has no bias")
    if self.final_kind is not None:
      check_choice(f"{prefix}.final_kind", self.final_kind, sorted(NORMS))
      if NORMS[self.final_kind].stateful != NORMS[self.kind].stateful:
        raise ConfigError(f"{prefix}.final_kind", "must be stateful (repbn/prepbn) exactly when "
                          f"kind '{self.kind}' is")
    for key in ("alpha_init", "alpha_init_attn"):
      if getattr(self, key) is not None:
        check_positive(f"{prefix}.{key}", getattr(self, key))
    if self.deferred and (self.kind != "rmsnorm" or self.scale or self.bias):
      raise ConfigError(f"{prefix}.deferred", "deferred normalisation needs a weightless "
                        f"RMSNorm (kind rmsnorm, scale false, bias false), got kind "
                        f"'{self.kind}' scale={self.scale} bias={self.bias}")
    for key in ("out_scale", "out_bias"):
      if getattr(self, key) is not None and not isinstance(getattr(self, key), bool):
        raise ConfigError(f"{prefix}.{key}", f"must be true, false or null, got "
                          f"{getattr(self, key)!r}")
    if self.out_bias and not NORMS[self.kind].supports_bias:
      raise ConfigError(f"{prefix}.out_bias", f"norm kind '{self.kind}' has no bias")
    if self.embed_scale is not None and not isinstance(self.embed_scale, bool):
      raise ConfigError(f"{prefix}.embed_scale", f"must be true, false or null, got "
                        f"{self.embed_scale!r}")
    for key in ("bhyt_kappa", "bhyt_lambda_in", "bhyt_lambda_post"):
      check_positive(f"{prefix}.{key}", getattr(self, key))
    if not (isinstance(self.momentum, (int, float)) and 0.0 < self.momentum <= 1.0):
      raise ConfigError(f"{prefix}.momentum", f"must be in (0, 1], got {self.momentum!r}")
    check_int(f"{prefix}.prepbn_warmup_steps", self.prepbn_warmup_steps, minimum=0)
    check_int(f"{prefix}.prepbn_decay_steps", self.prepbn_decay_steps, minimum=0)

  @property
  def uses_embed_scale(self) -> bool:
    return self.kind == "dyt" if self.embed_scale is None else self.embed_scale

  @property
  def is_stateful(self) -> bool:
    return NORMS[self.kind].stateful

  def for_role(self, role: str) -> "NormConfig":
    """The config of a norm placed in ``role``: sublayer-output norms take ``out_scale`` /
    ``out_bias`` when set."""
    if role not in OUT_ROLES or (self.out_scale is None and self.out_bias is None):
      return self
    return dataclasses.replace(
        self, scale=self.scale if self.out_scale is None else self.out_scale,
        bias=self.bias if self.out_bias is None else self.out_bias, out_scale=None, out_bias=None)

  def final(self) -> "NormConfig":
    """The config of the final norm before the head."""
    kind = self.final_kind
    if kind is None:
      kind = "rmsnorm" if self.kind == "bhyt" else self.kind
    return self if kind == self.kind else dataclasses.replace(self, kind=kind, final_kind=None)


ROLES = ("attn", "mlp", "attn_out", "mlp_out", "attn_post", "mlp_post", "final", "embed")
OUT_ROLES = ("attn_out", "mlp_out")
"""Where a norm sits: sublayer inputs (``attn``, ``mlp``), sublayer outputs (``*_out``: Peri-LN,
OLMo 2), after the residual add (``*_post``: Post-LN), before the head, after the embedding.
Role-aware kinds (DyT, BHyT) pick their initialisation from it."""


@dataclasses.dataclass(frozen=True)
class NormContext:
  """What stateful norms (``repbn``, ``prepbn``) need besides their input.

  training: use (and update) batch statistics; otherwise the running statistics.
  step: int32 scalar driving the PRepBN schedule (the training step, or at evaluation the last
    step trained, kept in the model state).
  mask: bool ``[batch, time]`` (or broadcastable to ``x.shape[:-1]``), True on real tokens;
    padding is left out of the batch statistics. None: every position counts.
  """

  training: bool = False
  step: Any = None
  mask: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class NormDef:
  """A registered norm.

  specs: ``(d, cfg) -> ParamSpec tree`` (or ``(d, cfg, role)`` when ``role_aware``).
  apply: ``(params, x, cfg) -> y``; for ``stateful`` kinds
    ``(params, state, x, cfg, nctx: NormContext) -> (y, new_state)``.
  state_specs: ``(d, cfg) -> ParamSpec tree`` of the non-trainable state (stateful kinds).
  """

  specs: Callable[..., Any]
  apply: Callable[..., Any]
  supports_bias: bool = True
  role_aware: bool = False
  stateful: bool = False
  state_specs: Callable[[int, "NormConfig"], Any] | None = None


NORMS: dict[str, NormDef] = {}
NORM_IMPLS = ("xla", "auto", "pallas")


def register(name: str, specs, apply, supports_bias: bool = True, *, role_aware: bool = False,
             stateful: bool = False, state_specs=None) -> None:
  if stateful and state_specs is None:
    raise ValueError(f"norms.register('{name}'): a stateful norm needs state_specs")
  NORMS[name] = NormDef(specs, apply, supports_bias, role_aware, stateful, state_specs)


def _get(cfg: NormConfig) -> NormDef:
  if cfg.kind not in NORMS:
    raise ConfigError("norm.kind", f"got {cfg.kind!r}; allowed values are {sorted(NORMS)}")
  return NORMS[cfg.kind]


def specs(d: int, cfg: NormConfig, role: str = "mlp"):
  """Parameter specs of one norm over width ``d`` placed in ``role`` (see :data:`ROLES`)."""
  norm = _get(cfg)
  if role not in ROLES:
    raise ValueError(f"norms.specs: unknown role {role!r}; roles are {ROLES}")
  cfg = cfg.for_role(role)
  return norm.specs(d, cfg, role) if norm.role_aware else norm.specs(d, cfg)


def state_specs(d: int, cfg: NormConfig):
  """Non-trainable state specs of one norm (``{}`` for stateless kinds)."""
  norm = _get(cfg)
  return norm.state_specs(d, cfg) if norm.stateful else {}


def apply(params, x: jax.Array, cfg: NormConfig) -> jax.Array:
  """Normalise ``x`` over its last axis with the (stateless) norm named by ``cfg.kind``."""
  norm = _get(cfg)
  if norm.stateful:
    raise ValueError(f"norm kind '{cfg.kind}' keeps running statistics; call "
                     "norms.apply_stateful(params, state, x, cfg, NormContext(...))")
  return norm.apply(params, x, cfg)


def apply_stateful(params, state, x: jax.Array, cfg: NormConfig,
                   nctx: NormContext) -> tuple[jax.Array, Any]:
  """Any norm with state threading: ``(y, new_state)``; stateless kinds return ``state`` as is."""
  norm = _get(cfg)
  if not norm.stateful:
    return norm.apply(params, x, cfg), state
  return norm.apply(params, state, x, cfg, nctx)


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
    y32 = y32 * (cfg.scale_offset + params["scale"].astype(y32.dtype))
  if "bias" in params:
    y32 = y32 + params["bias"].astype(y32.dtype)
  return y32


def stat_dtype(x: jax.Array):
  """Statistics dtype: float32, or float64 for float64 inputs (never below float32)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
  """``x / sqrt(mean(x²) + eps)`` in float32 (returns float32; float64 for float64 input)."""
  x32 = x.astype(stat_dtype(x))
  ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  return x32 * jax.lax.rsqrt(ms + eps)


def inv_rms(x: jax.Array, eps: float) -> jax.Array:
  """``1 / sqrt(mean(x²) + eps)`` over the last axis, kept as a size-1 axis (float32 or wider)."""
  x32 = x.astype(stat_dtype(x))
  return jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)


def layer_normalize(x: jax.Array, eps: float) -> jax.Array:
  """``(x - mean) / sqrt(var + eps)`` in float32 (returns float32; float64 for float64 input)."""
  x32 = x.astype(stat_dtype(x))
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  xc = x32 - mean
  var = jnp.mean(jnp.square(xc), axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + eps)


def crms_normalize(x_c: jax.Array, eps: float) -> jax.Array:
  """RMS normalisation of a zero-mean ``(n+1)``-vector stored as its first ``n`` coordinates.

  The dropped coordinate is ``-sum(x_c)``, so ``mean(x²) = (sum(x_c²) + sum(x_c)²) / (n+1)``.
  Returns the compressed normalised vector (float32, float64 for float64 input).
  """
  x32 = x_c.astype(stat_dtype(x_c))
  n = x32.shape[-1]
  ms = (jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
        + jnp.square(jnp.sum(x32, axis=-1, keepdims=True))) / (n + 1)
  return x32 * jax.lax.rsqrt(ms + eps)


def _scalar(value: float):
  return P.ParamSpec((), (), P.constant(value))


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


# CRMSNorm (Jiang et al. 2023): the residual stream is a zero-mean d-vector kept as d-1 numbers.
def _crmsnorm(params, x, cfg):
  return apply_affine(params, crms_normalize(x, cfg.eps), cfg).astype(x.dtype)


register("crmsnorm", affine_specs, _crmsnorm)


# Single-Scale RMSNorm (OSP): one learnable scalar gain.
def _single_scale_specs(d, cfg):
  del d
  return {"scale": _scalar(1.0 - cfg.scale_offset)}


def _single_scale(params, x, cfg):
  y = rms_normalize(x, cfg.eps)
  return (y * (cfg.scale_offset + params["scale"].astype(y.dtype))).astype(x.dtype)


register("single_scale_rmsnorm", _single_scale_specs, _single_scale, supports_bias=False)


# DyT (Zhu et al. 2025): gamma * tanh(alpha * x) + beta, no statistics at all.
def dyt_alpha_init(d: int, cfg: NormConfig, role: str) -> float:
  """Initial DyT ``alpha`` for a norm of width ``d`` in ``role`` (attention-side or not)."""
  attention_side = role.startswith("attn")
  explicit = cfg.alpha_init_attn if attention_side else cfg.alpha_init
  if explicit is not None:
    return float(explicit)
  if d <= 1024:
    attn, other = 1.0, 1.0
  elif d <= 2048:
    attn, other = 1.0, 0.5
  else:
    attn, other = 0.8, 0.2
  return attn if attention_side else other


def _dyt_specs(d, cfg, role):
  return {"alpha": _scalar(dyt_alpha_init(d, cfg, role)), **affine_specs(d, cfg)}


def _dyt(params, x, cfg):
  x32 = x.astype(stat_dtype(x))
  y = jnp.tanh(params["alpha"].astype(x32.dtype) * x32)
  return apply_affine(params, y, cfg).astype(x.dtype)


register("dyt", _dyt_specs, _dyt, role_aware=True)


# BHyT (Byun et al. 2025): gamma * tanh(lambda * x / (kappa * rms(x))).
def _bhyt_specs(d, cfg, role):
  post = role.endswith("_out") or role.endswith("_post")
  lam = cfg.bhyt_lambda_post if post else cfg.bhyt_lambda_in
  return {"lambda": _scalar(lam), **affine_specs(d, cfg)}


def _bhyt(params, x, cfg):
  y = rms_normalize(x, 1e-6 if cfg.eps == 0 else cfg.eps)
  y = jnp.tanh(params["lambda"].astype(y.dtype) * y / cfg.bhyt_kappa)
  return apply_affine(params, y, cfg).astype(x.dtype)


register("bhyt", _bhyt_specs, _bhyt, role_aware=True)


# SeeDNorm: [tanh(x·beta) * alpha + gamma] ⊙ x / rms(x); beta = 0 recovers RMSNorm.
def _seednorm_specs(d, cfg):
  s = {"beta": P.ParamSpec((d,), ("norm",), P.zeros),
       "alpha": P.ParamSpec((d,), ("norm",), P.ones)}
  s["scale"] = P.ParamSpec((d,), ("norm",), P.constant(1.0 - cfg.scale_offset))
  if cfg.bias:
    s["bias"] = P.ParamSpec((d,), ("norm",), P.zeros)
  return s


def _seednorm(params, x, cfg):
  y = rms_normalize(x, cfg.eps)
  x32 = x.astype(y.dtype)
  gate = jnp.tanh(jnp.einsum("...d,d->...", x32, params["beta"].astype(y.dtype)))[..., None]
  gain = gate * params["alpha"].astype(y.dtype) + cfg.scale_offset + params["scale"].astype(y.dtype)
  y = y * gain
  if "bias" in params:
    y = y + params["bias"].astype(y.dtype)
  return y.astype(x.dtype)


register("seednorm", _seednorm_specs, _seednorm)


# RepBN / PRepBN (SLAB, Guo et al. 2024): BatchNorm(x) + eta * x, progressively replacing LN.
def _repbn_specs(d, cfg):
  return {"bn_scale": P.ParamSpec((d,), ("norm",), P.ones),
          "bn_bias": P.ParamSpec((d,), ("norm",), P.zeros),
          "eta": _scalar(1.0)}


def _prepbn_specs(d, cfg):
  return {**_repbn_specs(d, cfg), **affine_specs(d, cfg)}


def _bn_state_specs(d, cfg):
  del cfg
  return {"mean": P.ParamSpec((d,), ("norm",), P.zeros),
          "var": P.ParamSpec((d,), ("norm",), P.ones)}


def batch_statistics(x: jax.Array, mask: jax.Array | None):
  """Per-channel mean and (biased) variance over every axis but the last, ``mask`` (True on
  real tokens, broadcastable to ``x.shape[:-1]``) leaving padding out. Float32 or wider."""
  x32 = x.astype(stat_dtype(x))
  axes = tuple(range(x.ndim - 1))
  if mask is None:
    mean = jnp.mean(x32, axis=axes)
    return mean, jnp.mean(jnp.square(x32 - mean), axis=axes)
  w = jnp.broadcast_to(mask, x.shape[:-1]).astype(x32.dtype)[..., None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(x32 * w, axis=axes) / n
  return mean, jnp.sum(jnp.square(x32 - mean) * w, axis=axes) / n


def repbn_affine(params, state, cfg: NormConfig):
  """Per-channel ``(a, c)`` with ``RepBN(x) = a ⊙ x + c`` under the running statistics."""
  dtype = jnp.promote_types(params["bn_scale"].dtype, jnp.float32)
  mean, var = state["mean"].astype(dtype), state["var"].astype(dtype)
  inv = jax.lax.rsqrt(var + cfg.eps) * params["bn_scale"].astype(dtype)
  return inv + params["eta"].astype(dtype), params["bn_bias"].astype(dtype) - mean * inv


def prepbn_lambda(step, cfg: NormConfig) -> jax.Array:
  """The LayerNorm weight of PRepBN at ``step``: 1 during warm-up, then linear decay to 0."""
  step = jnp.asarray(step, jnp.float32)
  after = step - cfg.prepbn_warmup_steps
  if cfg.prepbn_decay_steps == 0:
    return jnp.where(after < 0, 1.0, 0.0)
  return jnp.clip(1.0 - after / cfg.prepbn_decay_steps, 0.0, 1.0)


def _repbn_core(params, state, x, cfg, nctx):
  x32 = x.astype(stat_dtype(x))
  if nctx.training:
    mean, var = batch_statistics(x32, nctx.mask)
    m = cfg.momentum
    new_state = {
        "mean": (1 - m) * state["mean"] + m * jax.lax.stop_gradient(mean).astype(state["mean"].dtype),
        "var": (1 - m) * state["var"] + m * jax.lax.stop_gradient(var).astype(state["var"].dtype)}
  else:
    mean, var = state["mean"].astype(x32.dtype), state["var"].astype(x32.dtype)
    new_state = state
  bn = (x32 - mean) * jax.lax.rsqrt(var + cfg.eps)
  bn = bn * params["bn_scale"].astype(x32.dtype) + params["bn_bias"].astype(x32.dtype)
  return bn + params["eta"].astype(x32.dtype) * x32, new_state


def _repbn(params, state, x, cfg, nctx):
  y, new_state = _repbn_core(params, state, x, cfg, nctx)
  return y.astype(x.dtype), new_state


def _prepbn(params, state, x, cfg, nctx):
  if nctx.step is None:
    raise ValueError("prepbn: NormContext.step is required (it drives the LN → RepBN schedule)")
  rep, new_state = _repbn_core(params, state, x, cfg, nctx)
  ln = apply_affine(params, layer_normalize(x, cfg.eps), cfg)
  lam = prepbn_lambda(nctx.step, cfg).astype(rep.dtype)
  return (lam * ln + (1.0 - lam) * rep).astype(x.dtype), new_state


register("repbn", _repbn_specs, _repbn, supports_bias=False, stateful=True,
         state_specs=_bn_state_specs)
register("prepbn", _prepbn_specs, _prepbn, stateful=True, state_specs=_bn_state_specs)


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
