"""The per-call context handed from the model to blocks and attention layers."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class Context:
  """What a layer may need besides its input.

  positions: int32 ``[batch, time]`` absolute positions (RoPE and causal masks).
  segment_ids: int32 ``[batch, time]`` document ids for packed sequences (tokens attend only
    within their segment; 0 is padding by convention), or None.
  layer_idx: 0-based layer index; a traced scalar inside ``lax.scan``.
  n_layers: total number of layers (static).
  cache_index: where new tokens are written in a decoding cache (traced scalar), or None.
  training: whether this is a training step (dropout, batch statistics).
  extras: free-form static or traced values a block family needs (e.g. a training step).
  """

  positions: jax.Array
  segment_ids: jax.Array | None = None
  layer_idx: Any = 0
  n_layers: int = 1
  cache_index: Any = None
  training: bool = False
  extras: dict = dataclasses.field(default_factory=dict)

  def replace(self, **kw) -> "Context":
    return dataclasses.replace(self, **kw)
