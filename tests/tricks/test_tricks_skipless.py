import jax
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import model
from jaxblocks.tricks import skipless
from tests.helpers import tiny_config, tokens
from tests.tricks.tricks_helpers import apply, init, assert_close_rel, cached_logits, perturb


def _cfg(**kw):
  base = dict(n_layers=3, block=jb.BlockConfig(topology="skipless"),
              norm=jb.NormConfig(kind="none"), init_std=0.2)
  base.update(kw)
  return tiny_config(**base)


@pytest.mark.parametrize("kw", [
    dict(mlp=jb.MlpConfig(kind="gelu")),
    dict(mlp=jb.MlpConfig(kind="swiglu"), init_std=0.3, position_embedding="learned",
         scale_embeddings=True, tie_embeddings=False,
         attention=jb.AttentionConfig(n_heads=4, n_kv_heads=2, bias=True, out_bias=True)),
])
def test_weight_removal_keeps_logits(kw):
  cfg = _cfg(**kw)
  params = perturb(init(cfg, jax.random.key(0)), 1)
  new, new_cfg = skipless.convert(params, cfg)
  assert new_cfg.block.topology == "skipless_merged"
  if not cfg.attention.bias:  # W_Q, W_P gone; a tied model gains an explicit head
    removed = model.count_params(cfg) - model.count_params(new_cfg)
    assert removed == skipless.weights_removed(cfg) - cfg.vocab_size * cfg.d_model * (
        cfg.tie_embeddings)
  t = tokens()
  ref = apply(params, t, cfg)
  assert_close_rel(apply(new, t, new_cfg), ref, 1e-4)
  assert_close_rel(cached_logits(new, new_cfg, t, prompt_len=5), ref, 1e-4)


def test_weight_removal_preconditions():
  with pytest.raises(jb.ConfigError, match="norm.kind"):
    skipless.check_config(_cfg(norm=jb.NormConfig()))
  with pytest.raises(jb.ConfigError, match="topology"):
    skipless.check_config(_cfg(block=jb.BlockConfig(topology="pre")))
  with pytest.raises(jb.ConfigError, match="head_dim"):
    skipless.check_config(_cfg(attention=jb.AttentionConfig(n_heads=4, head_dim=4)))
  cfg = _cfg()
  params = init(cfg, jax.random.key(0))
  params["layers"][0]["attn"]["wq"] = params["layers"][0]["attn"]["wq"].at[1, :, 0, 0].set(0.0)
  with pytest.raises(ValueError, match="layer 1: W_Q has condition number"):
    skipless.convert(params, cfg)
