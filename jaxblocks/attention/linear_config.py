"""Configuration of the linear-attention kinds (``gla``, ``linear``, ``retention``, ``sla``).

Each kind reads its own sub-config from :class:`jaxblocks.attention.base.AttentionConfig`
(``attention.gla``, ``attention.linear``, ``attention.retention``, ``attention.sla``) next to the
shared ``n_heads`` / ``n_kv_heads`` / ``head_dim`` / ``rope`` options. The fields every kind shares:

form: operator form for full-sequence calls — ``chunk`` (linear in T, default), ``parallel``
  (quadratic, short sequences) or ``recurrent`` (token scan, reference). Prefill with a cache
  always uses ``chunk``; single-token decoding uses the recurrent step.
chunk_size / sub_chunk: chunkwise-form chunk (default 64) and secondary chunk (default 16).
short_conv / conv_size: causal depthwise convolution (kernel ``conv_size``, SiLU) on the q, k, v
  projections, as in modern linear-attention models.
impl: how the chunkwise form runs — ``auto`` (Pallas kernel on TPU/GPU, XLA on CPU), ``xla`` or
  ``pallas`` (see :mod:`jaxblocks.kernels.gla.api`).
"""

from __future__ import annotations

import dataclasses

from jaxblocks.errors import check_choice, check_int, check_positive, ConfigError

FORMS = ("chunk", "parallel", "recurrent")
IMPLS = ("auto", "xla", "pallas")
FEATURE_MAPS = ("elu1", "relu", "identity")


@dataclasses.dataclass(frozen=True)
class LinearCommonConfig:
  form: str = "chunk"
  chunk_size: int = 64
  sub_chunk: int = 16
  short_conv: bool = False
  conv_size: int = 4
  impl: str = "auto"

  def validate(self, prefix: str) -> None:
    check_choice(f"{prefix}.form", self.form, FORMS)
    check_choice(f"{prefix}.impl", self.impl, IMPLS)
    check_int(f"{prefix}.chunk_size", self.chunk_size, minimum=1)
    check_int(f"{prefix}.sub_chunk", self.sub_chunk, minimum=1)
    if self.chunk_size % self.sub_chunk:
      raise ConfigError(f"{prefix}.chunk_size", f"must be a multiple of sub_chunk="
                        f"{self.sub_chunk}, got {self.chunk_size}")
    check_int(f"{prefix}.conv_size", self.conv_size, minimum=1)


@dataclasses.dataclass(frozen=True)
class GLAConfig(LinearCommonConfig):
  """Gated linear attention (Yang et al. 2024).

  expand_k / expand_v: total key / value width as a fraction of d_model (dk = d/2, dv = d),
  split over ``attention.n_heads`` heads. gate_low_rank / gate_temperature: the forget gate
  ``logsigmoid(x W1 W2 + b) / τ`` (rank 16, τ = 16). norm_eps: head-wise output RMSNorm.
  output_gate: ``swish(x W_r) ⊙ RMSNorm(o)`` (off: ``RMSNorm(o)`` alone).
  """

  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank: int = 16
  gate_temperature: float = 16.0
  norm_eps: float = 1e-5
  output_gate: bool = True

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    check_positive(f"{prefix}.expand_k", self.expand_k)
    check_positive(f"{prefix}.expand_v", self.expand_v)
    check_int(f"{prefix}.gate_low_rank", self.gate_low_rank, minimum=1)
    check_positive(f"{prefix}.gate_temperature", self.gate_temperature)
    check_positive(f"{prefix}.norm_eps", self.norm_eps)


@dataclasses.dataclass(frozen=True)
class LinearConfig(LinearCommonConfig):
  """Linear attention (Katharopoulos et al. 2020): ``φ(q)S / (φ(q)·z + eps)``.

  feature_map: ``elu1`` (elu + 1), ``relu`` or ``identity``. normalize: divide by the
  normalizer ``φ(q)·Σφ(k)``; without it the output gets a head-wise RMSNorm (``norm_eps``) and
  queries the usual ``head_dim ** -0.5`` scale.
  """

  feature_map: str = "elu1"
  normalize: bool = True
  eps: float = 1e-6
  norm_eps: float = 1e-5

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    check_choice(f"{prefix}.feature_map", self.feature_map, FEATURE_MAPS)
    check_positive(f"{prefix}.eps", self.eps)
    check_positive(f"{prefix}.norm_eps", self.norm_eps)


@dataclasses.dataclass(frozen=True)
class RetentionConfig(LinearCommonConfig):
  """RetNet multi-scale retention: decay ``γ_h = 1 − 2^(−5−h)`` per head, GroupNorm of each
  head's output, ``swish(x W_g)`` gate. value_factor: value width per head relative to
  ``head_dim`` (RetNet uses 2)."""

  value_factor: float = 2.0
  norm_eps: float = 1e-5

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    check_positive(f"{prefix}.value_factor", self.value_factor)
    check_positive(f"{prefix}.norm_eps", self.norm_eps)


@dataclasses.dataclass(frozen=True)
class SLAConfig(LinearCommonConfig):
  """Simplified linear attention (SLAB), causal: ``ReLU(q)·S / (ReLU(q)·z + eps)`` with a
  learned additive position term on keys (``max_positions`` rows; positions beyond it reuse the
  last row) and a causal depthwise convolution of the values (kernel ``value_conv_size``,
  weights shared across heads) added to the output."""

  value_conv_size: int = 5
  position_term: bool = True
  max_positions: int = 2048
  eps: float = 1e-6

  def validate(self, prefix: str) -> None:
    super().validate(prefix)
    check_int(f"{prefix}.value_conv_size", self.value_conv_size, minimum=1)
    check_int(f"{prefix}.max_positions", self.max_positions, minimum=1)
    check_positive(f"{prefix}.eps", self.eps)
