"""``ModelConfig``: the whole model's configuration, composed of the sub-configs that live beside
the subsystems they configure (``NormConfig`` in norms.py, ``AttentionConfig`` in
attention/base.py, ``MlpConfig`` in mlp.py, ``BlockConfig`` in blocks.py)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import jax.numpy as jnp

from jaxblocks.attention.base import ATTENTION, AttentionConfig
from jaxblocks.blocks import BlockConfig
from jaxblocks.errors import ConfigError, check_choice, check_int, check_positive
from jaxblocks.mlp import MlpConfig
from jaxblocks.norms import NormConfig

REMAT_POLICIES = ("none", "full", "save_dots", "save_named")
POSITION_EMBEDDINGS = ("none", "learned")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class LayerTyingConfig:
  """Layer tying / recursive depth: ``n_layers`` layers built from ``unique_layers`` parameter
  sets used cyclically (layer ``l`` uses set ``l % unique_layers``; None = no tying). ``lora_rank``
  > 0 relaxes the tying with a per-layer low-rank delta ``A·B`` (B zero-initialised) on every
  matrix that reads or writes the residual stream."""

  unique_layers: int | None = None
  lora_rank: int = 0

  def validate(self, n_layers: int, period: int, prefix: str = "model.layer_tying") -> None:
    if self.unique_layers is not None:
      check_int(f"{prefix}.unique_layers", self.unique_layers, minimum=1)
      if self.unique_layers > n_layers:
        raise ConfigError(f"{prefix}.unique_layers", f"must be <= n_layers={n_layers}, got "
                          f"{self.unique_layers}")
      if self.unique_layers % period:
        raise ConfigError(f"{prefix}.unique_layers", f"must be a multiple of len("
                          f"attention_pattern)={period}, got {self.unique_layers}")
    check_int(f"{prefix}.lora_rank", self.lora_rank, minimum=0)
    if self.lora_rank and self.unique_layers is None:
      raise ConfigError(f"{prefix}.lora_rank", "needs unique_layers (LoRA relaxes tied layers)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only language model.

  attention_pattern: attention kind per layer, repeated cyclically over depth (e.g.
    ``("gla", "gla", "gla", "softmax")``); n_layers must be a multiple of its length.
  position_embedding: ``learned`` absolute positions added to the embedding (GPT-2), or ``none``
    (use RoPE via ``attention.rope``).
  scale_embeddings: multiply token embeddings by sqrt(d_model) (Gemma).
  final_norm: apply ``norm`` before the head.
  logit_softcap: tanh soft-capping of the output logits (Gemma 2).
  scan_layers: run layers under ``lax.scan`` (compile time flat in depth) or unrolled.
  remat: ``none`` | ``full`` | ``save_dots`` | ``save_named`` (keep ``remat_save`` activations).
  dtype: compute dtype; param_dtype: storage dtype of the weights.
  layer_tying: share parameter sets across depth (:class:`LayerTyingConfig`).
  precomputed_first_layer: layer 0's per-token work is read from ``params["embed"]
    ["first_layer"]`` (set by :func:`jaxblocks.tricks.precompute_first_layer.convert`).
  """

  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  max_seq_len: int = 1024
  attention_pattern: tuple[str, ...] = ("softmax",)
  norm: NormConfig = dataclasses.field(default_factory=NormConfig)
  attention: AttentionConfig = dataclasses.field(default_factory=AttentionConfig)
  mlp: MlpConfig = dataclasses.field(default_factory=MlpConfig)
  block: BlockConfig = dataclasses.field(default_factory=BlockConfig)
  position_embedding: str = "none"
  tie_embeddings: bool = True
  scale_embeddings: bool = False
  final_norm: bool = True
  head_bias: bool = False
  logit_softcap: float | None = None
  init_std: float = 0.02
  scan_layers: bool = True
  remat: str = "none"
  remat_save: tuple[str, ...] = ("attn_out", "mlp_out")
  dtype: str = "float32"
  param_dtype: str = "float32"
  layer_tying: LayerTyingConfig = dataclasses.field(default_factory=LayerTyingConfig)
  precomputed_first_layer: bool = False

  def __post_init__(self):
    for name in ("attention_pattern", "remat_save"):
      v = getattr(self, name)
      if isinstance(v, str):
        v = (v,)
      object.__setattr__(self, name, tuple(v))

  # -- derived
  @property
  def period(self) -> int:
    return len(self.attention_pattern)

  @property
  def repeats(self) -> int:
    return self.n_layers // self.period

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def validate(self) -> "ModelConfig":
    check_int("model.vocab_size", self.vocab_size, minimum=1)
    check_int("model.d_model", self.d_model, minimum=1)
    check_int("model.n_layers", self.n_layers, minimum=1)
    check_int("model.max_seq_len", self.max_seq_len, minimum=1)
    if not self.attention_pattern:
      raise ConfigError("model.attention_pattern", "must name at least one attention kind")
    for kind in self.attention_pattern:
      check_choice("model.attention_pattern", kind, sorted(ATTENTION))
    if self.n_layers % self.period:
      raise ConfigError("model.n_layers", f"must be a multiple of len(attention_pattern)="
                        f"{self.period}, got {self.n_layers}")
    self.norm.validate("model.norm")
    self.attention.validate(self.d_model, "model.attention")
    self.mlp.validate("model.mlp")
    self.block.validate("model.block")
    if self.norm.deferred:
      if self.block.topology not in ("pre", "parallel"):
        raise ConfigError("model.norm.deferred", "deferred normalisation applies to sublayer-input "
                          "norms feeding projections only: topology must be 'pre' or 'parallel', "
                          f"got '{self.block.topology}'")
      if set(self.attention_pattern) != {"softmax"} or self.block.embed_norm:
        raise ConfigError("model.norm.deferred", "deferred normalisation supports softmax "
                          "attention layers without an embedding norm")
    self.layer_tying.validate(self.n_layers, self.period)
    check_choice("model.position_embedding", self.position_embedding, POSITION_EMBEDDINGS)
    check_choice("model.remat", self.remat, REMAT_POLICIES)
    check_choice("model.dtype", self.dtype, sorted(DTYPES))
    check_choice("model.param_dtype", self.param_dtype, sorted(DTYPES))
    check_positive("model.init_std", self.init_std)
    if self.logit_softcap is not None:
      check_positive("model.logit_softcap", self.logit_softcap)
    return self

  # -- (de)serialisation
  def to_dict(self) -> dict[str, Any]:
    return _to_dict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], prefix: str = "model") -> "ModelConfig":
    return _from_dict(cls, d, prefix)


def _to_dict(obj):
  if dataclasses.is_dataclass(obj):
    return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, tuple):
    return [_to_dict(x) for x in obj]
  return obj


def _from_dict(cls, d, prefix):
  """Build a (nested) config dataclass from a mapping, rejecting unknown keys by name."""
  if d is None:
    d = {}
  if not isinstance(d, Mapping):
    raise ConfigError(prefix, f"expected a mapping, got {type(d).__name__}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown key; valid keys are {sorted(fields)}")
  kwargs = {}
  for k, v in d.items():
    t = hints[k]
    if dataclasses.is_dataclass(t):
      kwargs[k] = _from_dict(t, v, f"{prefix}.{k}")
    else:
      kwargs[k] = v
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(prefix, str(e)) from None
