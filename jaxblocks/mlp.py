"""Feed-forward blocks: gated (SwiGLU, GeGLU) and plain (GELU, ReLU, squared ReLU) MLPs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxblocks import params as P
from jaxblocks import sharding
from jaxblocks.errors import check_choice, check_int

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
}

# kind -> (activation, gated)
KINDS = {
    "swiglu": ("silu", True),
    "geglu": ("gelu_tanh", True),
    "geglu_exact": ("gelu", True),
    "gelu": ("gelu", False),
    "gelu_tanh": ("gelu_tanh", False),
    "relu": ("relu", False),
    "squared_relu": ("squared_relu", False),
}


@dataclasses.dataclass(frozen=True)
class MlpConfig:
  """kind: one of ``KINDS``; d_ff: hidden width (None → 4·d for plain, 8/3·d rounded to 64 for
  gated); bias: learn biases on both projections."""

  kind: str = "swiglu"
  d_ff: int | None = None
  bias: bool = False

  def validate(self, prefix: str = "mlp") -> None:
    check_choice(f"{prefix}.kind", self.kind, sorted(KINDS))
    if self.d_ff is not None:
      check_int(f"{prefix}.d_ff", self.d_ff, minimum=1)

  def hidden(self, d_model: int) -> int:
    if self.d_ff is not None:
      return self.d_ff
    if KINDS[self.kind][1]:
      return max(64, int(round(8 * d_model / 3 / 64)) * 64)
    return 4 * d_model


def specs(d_model: int, cfg: MlpConfig, init_std: float = 0.02, out_std: float | None = None):
  f = cfg.hidden(d_model)
  out_std = init_std if out_std is None else out_std
  s = {
      "w_up": P.ParamSpec((d_model, f), ("embed", "mlp"), P.normal(init_std)),
      "w_down": P.ParamSpec((f, d_model), ("mlp", "embed"), P.normal(out_std)),
  }
  if KINDS[cfg.kind][1]:
    s["w_gate"] = P.ParamSpec((d_model, f), ("embed", "mlp"), P.normal(init_std))
  if cfg.bias:
    s["b_up"] = P.ParamSpec((f,), ("mlp",), P.zeros)
    s["b_down"] = P.ParamSpec((d_model,), ("embed",), P.zeros)
    if KINDS[cfg.kind][1]:
      s["b_gate"] = P.ParamSpec((f,), ("mlp",), P.zeros)
  return s


def apply(params, x_btd: jax.Array, cfg: MlpConfig, input_scale_bt1=None) -> jax.Array:
  """``down(act(gate(x)) * up(x))`` for gated kinds, ``down(act(up(x)))`` otherwise.

  ``input_scale_bt1``: a per-token factor applied to the input projections' outputs (deferred
  normalisation: ``(x·W)·s = (x·s)·W``); the input projections must then be bias-free."""
  act_name, gated = KINDS[cfg.kind]
  act = ACTIVATIONS[act_name]
  h = jnp.einsum("btd,df->btf", x_btd, params["w_up"])
  if input_scale_bt1 is not None:
    if "b_up" in params:
      raise ValueError("mlp: deferred normalisation needs bias-free input projections "
                       "(model.mlp.bias=false)")
    h = (h * input_scale_bt1).astype(x_btd.dtype)
  if "b_up" in params:
    h = h + params["b_up"]
  if gated:
    g = jnp.einsum("btd,df->btf", x_btd, params["w_gate"])
    if input_scale_bt1 is not None:
      g = (g * input_scale_bt1).astype(x_btd.dtype)
    if "b_gate" in params:
      g = g + params["b_gate"]
    h = act(g) * h
  else:
    h = act(h)
  h = sharding.constrain(h, ("batch", "seq", "mlp"))
  y = jnp.einsum("btf,fd->btd", h, params["w_down"])
  if "b_down" in params:
    y = y + params["b_down"]
  return y
