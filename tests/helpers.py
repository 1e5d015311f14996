"""Small shared builders for tests."""

import contextlib

import jax
import jax.numpy as jnp

import jaxblocks as jb


def tiny_config(**kw) -> jb.ModelConfig:
  base = dict(vocab_size=61, d_model=32, n_layers=2, max_seq_len=64,
              attention=jb.AttentionConfig(n_heads=4, n_kv_heads=2))
  base.update(kw)
  return jb.ModelConfig(**base).validate()


def tokens(batch=2, time=12, vocab=61, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, time), 0, vocab, dtype=jnp.int32)


def cuda_export_target():
  """Context for exporting Pallas → Triton for CUDA on a machine without a GPU: newer jax asks
  for the target GPU as an abstract device (an H100 here); older jax needs nothing."""
  sharding = jax.sharding
  if not hasattr(sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
  mesh = sharding.AbstractMesh((1,), ("gpu",), axis_types=(sharding.AxisType.Auto,),
                               abstract_device=device)
  return sharding.use_abstract_mesh(mesh)
