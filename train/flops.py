"""Model FLOPs per token and per-chip peak FLOP/s, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax

from jaxblocks import model as jb_model
from jaxblocks.config import ModelConfig

# Dense bfloat16 peak FLOP/s per chip (vendor datasheets), matched by prefix of device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU7x": 2307e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA B200": 2250e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device, or None when unknown (CPUs)."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward + backward FLOPs per token: 6 * non-embedding params plus causal attention
  scores and values (12 * layers * d_attention * seq_len / 2 for causal), plus the head."""
  n = jb_model.count_params(cfg, non_embedding=True)
  attn_dim = cfg.attention.n_heads * cfg.attention.dim(cfg.d_model)
  attention = 12 * cfg.n_layers * attn_dim * seq_len / 2
  head = 6 * cfg.d_model * cfg.vocab_size if cfg.tie_embeddings else 0  # untied: in n
  return 6 * n + attention + head
