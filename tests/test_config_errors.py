"""Bad configs and bad inputs fail early with a message that names the problem."""

import jax
import jax.numpy as jnp
import pytest

import jaxblocks as jb
from jaxblocks import model
from tests.helpers import tiny_config

A = jb.AttentionConfig

BAD_CONFIGS = [
    (dict(attention=A(n_heads=5)), "model.attention.n_heads", "divide d_model"),
    (dict(attention=A(n_heads=4, n_kv_heads=3)), "model.attention.n_kv_heads", "divide n_heads"),
    (dict(attention=A(qk_norm="layer")), "model.attention.qk_norm", "allowed values"),
    (dict(attention=A(impl="flash")), "model.attention.impl", "allowed values"),
    (dict(attention=A(rotary_fraction=1.5)), "model.attention.rotary_fraction", "[0, 1]"),
    (dict(attention=A(sliding_window=0)), "model.attention.sliding_window", ">= 1"),
    (dict(norm=jb.NormConfig(kind="batchnorm2")), "model.norm.kind", "allowed values"),
    (dict(norm=jb.NormConfig(eps=-1.0)), "model.norm.eps", "non-negative"),
    (dict(mlp=jb.MlpConfig(kind="swish")), "model.mlp.kind", "allowed values"),
    (dict(block=jb.BlockConfig(topology="sideways")), "model.block.topology", "allowed values"),
    (dict(n_layers=3, attention_pattern=("softmax", "softmax")), "model.n_layers", "multiple"),
    (dict(attention_pattern=("mamba9",)), "model.attention_pattern", "allowed values"),
    (dict(remat="sometimes"), "model.remat", "allowed values"),
    (dict(dtype="float8"), "model.dtype", "allowed values"),
    (dict(vocab_size=0), "model.vocab_size", ">= 1"),
    (dict(d_model=32.0), "model.d_model", "integer"),
    (dict(position_embedding="sinusoid"), "model.position_embedding", "allowed values"),
]


@pytest.mark.parametrize("kw, key, text", BAD_CONFIGS)
def test_bad_config(kw, key, text):
  base = dict(vocab_size=61, d_model=32, n_layers=2)
  base.update(kw)
  with pytest.raises(jb.ConfigError) as e:
    jb.ModelConfig(**base).validate()
  assert e.value.key == key
  assert text in str(e.value)


def test_from_dict_rejects_unknown_keys_by_name():
  with pytest.raises(jb.ConfigError, match="model.attention.n_head'"):
    jb.ModelConfig.from_dict({"attention": {"n_head": 4}})
  cfg = jb.ModelConfig.from_dict({"d_model": 64, "attention": {"n_heads": 8},
                                  "attention_pattern": ["softmax"]})
  assert cfg.attention.n_heads == 8 and cfg.attention_pattern == ("softmax",)
  assert jb.ModelConfig.from_dict(cfg.to_dict()) == cfg


BAD_INPUTS = [
    (jnp.zeros((2, 3, 4), jnp.int32), "shape \\[batch, time\\]"),
    (jnp.zeros((2, 3), jnp.float32), "integers"),
]


@pytest.mark.parametrize("tokens, text", BAD_INPUTS)
def test_bad_model_inputs(tokens, text):
  cfg = tiny_config()
  params = model.init(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=text):
    model.apply(params, tokens, cfg)


def test_bad_generate_arguments():
  cfg = tiny_config(position_embedding="learned", max_seq_len=8)
  params = model.init(cfg, jax.random.key(0))
  prompt = jnp.zeros((1, 4), jnp.int32)
  for kw, text in [(dict(max_new_tokens=0), "max_new_tokens"), (dict(top_k=0), "top_k"),
                   (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
                   (dict(max_new_tokens=10), "max_seq_len")]:
    with pytest.raises(ValueError, match=text):
      model.generate(params, prompt, cfg, **kw)
  with pytest.raises(ValueError, match="max_seq_len"):
    model.apply(params, jnp.zeros((1, 9), jnp.int32), cfg)
