"""Small shared builders for tests."""

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
