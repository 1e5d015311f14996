"""Attention configuration and the registry of attention kinds.

An attention kind (``softmax``, and the linear family in later modules) provides

* ``specs(d_model, cfg, init_std) -> tree of ParamSpec``,
* ``apply(params, x_btd, cfg, ctx, cache) -> (y_btd, new_cache)`` (cache None when not decoding),
* ``init_cache(batch, max_len, cfg, dtype) -> tree`` (decoding state: KV cache or recurrent state).

The model picks a kind per layer from ``ModelConfig.attention_pattern``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jaxblocks.attention.linear_config import GLAConfig, LinearConfig, RetentionConfig, SLAConfig
from jaxblocks.errors import ConfigError, check_choice, check_int, check_positive

IMPLS = ("auto", "xla", "cudnn", "reference")
QK_NORMS = ("none", "head", "full")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Options shared by the attention kinds.

  n_heads / n_kv_heads: query heads and key/value heads (GQA when fewer, MQA when 1).
  head_dim: per-head width (None → d_model // n_heads).
  bias / out_bias: biases on the q/k/v and on the output projection.
  qk_norm: RMSNorm on queries and keys — per head (``head``), over all heads (``full``), or none.
  qk_norm_offset: the QK-norm gain is ``qk_norm_offset + w`` (Gemma 3 stores ``w`` with offset 1,
    like ``NormConfig.scale_offset``); 0: the usual gain ``w`` initialised at 1.
  rope / rope_theta / rotary_fraction: rotary embeddings (partial when fraction < 1).
  sliding_window: attend to at most this many most recent keys (None = full causal).
  sliding_window_pattern: per-layer switch, repeated cyclically over depth: layer ``l`` uses
    ``sliding_window`` iff ``sliding_window_pattern[l % len]`` is true, else full causal attention
    (Gemma 2 alternates ``(True, False)``; Gemma 3 uses five local layers per global one). None:
    every layer uses ``sliding_window``.
  rope_theta_local: RoPE theta of the sliding-window layers (Gemma 3); None: ``rope_theta``.
  softcap: tanh soft-capping of attention logits (Gemma 2).
  scale: logit scale (None → head_dim ** -0.5).
  impl: ``auto`` (cuDNN on GPU where supported, XLA otherwise), ``xla``, ``cudnn``, ``reference``.
  gla / linear / retention / sla: options of the linear-attention kinds (attention/linear_config.py).
  """

  n_heads: int = 4
  n_kv_heads: int | None = None
  head_dim: int | None = None
  bias: bool = False
  out_bias: bool = False
  qk_norm: str = "none"
  qk_norm_eps: float = 1e-6
  qk_norm_offset: float = 0.0
  rope: bool = True
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0
  sliding_window: int | None = None
  sliding_window_pattern: tuple[bool, ...] | None = None
  rope_theta_local: float | None = None
  softcap: float | None = None
  scale: float | None = None
  impl: str = "auto"
  gla: GLAConfig = dataclasses.field(default_factory=GLAConfig)
  linear: LinearConfig = dataclasses.field(default_factory=LinearConfig)
  retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
  sla: SLAConfig = dataclasses.field(default_factory=SLAConfig)

  def __post_init__(self):
    if self.sliding_window_pattern is not None:
      object.__setattr__(self, "sliding_window_pattern",
                         tuple(bool(v) for v in self.sliding_window_pattern))

  def layer_window(self, layer_idx):
    """The sliding window of layer ``layer_idx`` (an int, or traced under the layer scan): None
    for full attention; a traced int32 (a window larger than any sequence on global layers) when
    the pattern is selected by a traced index."""
    if self.sliding_window is None or self.sliding_window_pattern is None:
      return self.sliding_window
    pattern = self.sliding_window_pattern
    if isinstance(layer_idx, int):
      return self.sliding_window if pattern[layer_idx % len(pattern)] else None
    import jax.numpy as jnp
    is_local = jnp.asarray(pattern)[layer_idx % len(pattern)]
    return jnp.where(is_local, self.sliding_window, jnp.iinfo(jnp.int32).max).astype(jnp.int32)

  def layer_rope_theta(self, layer_idx):
    """RoPE theta of layer ``layer_idx``: ``rope_theta_local`` on sliding-window layers."""
    if self.rope_theta_local is None or self.sliding_window is None:
      return self.rope_theta
    if self.sliding_window_pattern is None:
      return self.rope_theta_local
    pattern = self.sliding_window_pattern
    if isinstance(layer_idx, int):
      return self.rope_theta_local if pattern[layer_idx % len(pattern)] else self.rope_theta
    import jax.numpy as jnp
    is_local = jnp.asarray(pattern)[layer_idx % len(pattern)]
    return jnp.where(is_local, jnp.float32(self.rope_theta_local), jnp.float32(self.rope_theta))

  def kv_heads(self) -> int:
    return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

  def dim(self, d_model: int) -> int:
    return d_model // self.n_heads if self.head_dim is None else self.head_dim

  def validate(self, d_model: int, prefix: str = "attention") -> None:
    check_int(f"{prefix}.n_heads", self.n_heads, minimum=1)
    if self.n_kv_heads is not None:
      check_int(f"{prefix}.n_kv_heads", self.n_kv_heads, minimum=1)
      if self.n_heads % self.n_kv_heads:
        raise ConfigError(f"{prefix}.n_kv_heads", f"must divide n_heads={self.n_heads}, got "
                          f"{self.n_kv_heads}")
    if self.head_dim is None:
      if d_model % self.n_heads:
        raise ConfigError(f"{prefix}.n_heads", f"must divide d_model={d_model} (or set "
                          f"{prefix}.head_dim), got {self.n_heads}")
    else:
      check_int(f"{prefix}.head_dim", self.head_dim, minimum=1)
    check_choice(f"{prefix}.qk_norm", self.qk_norm, QK_NORMS)
    check_choice(f"{prefix}.impl", self.impl, IMPLS)
    check_positive(f"{prefix}.rope_theta", self.rope_theta)
    if not 0.0 <= self.rotary_fraction <= 1.0:
      raise ConfigError(f"{prefix}.rotary_fraction", f"must be in [0, 1], got {self.rotary_fraction}")
    if self.sliding_window is not None:
      check_int(f"{prefix}.sliding_window", self.sliding_window, minimum=1)
    if self.sliding_window_pattern is not None:
      if not self.sliding_window_pattern:
        raise ConfigError(f"{prefix}.sliding_window_pattern", "must be None or non-empty")
      if self.sliding_window is None:
        raise ConfigError(f"{prefix}.sliding_window_pattern", "needs sliding_window to be set")
    if self.rope_theta_local is not None:
      check_positive(f"{prefix}.rope_theta_local", self.rope_theta_local)
    if self.softcap is not None:
      check_positive(f"{prefix}.softcap", self.softcap)
    if self.scale is not None:
      check_positive(f"{prefix}.scale", self.scale)
    for name in ("gla", "linear", "retention", "sla"):
      getattr(self, name).validate(f"{prefix}.{name}")


@dataclasses.dataclass(frozen=True)
class AttentionKind:
  specs: Callable[..., Any]
  apply: Callable[..., Any]
  init_cache: Callable[..., Any]


ATTENTION: dict[str, AttentionKind] = {}


def register(name: str, specs, apply, init_cache) -> None:
  ATTENTION[name] = AttentionKind(specs, apply, init_cache)


def get(name: str) -> AttentionKind:
  if name not in ATTENTION:
    raise ValueError(f"unknown attention kind '{name}'; registered kinds are {sorted(ATTENTION)}")
  return ATTENTION[name]
