import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import model
from jaxblocks.tricks import slim_attention
from tests.helpers import tiny_config, tokens
from tests.tricks.tricks_helpers import apply, init, cached_logits

# Decoding tolerance: W_KV is exact in float64 but stored in float32; the K-only path reorders
# the value computation, so logits agree to float32 rounding (relative 1e-5 of unit logits).
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bias,window", [(False, None), (True, 3)])
def test_slim_decoding_matches_original(bias, window):
  cfg = tiny_config(n_layers=2, attention=jb.AttentionConfig(
      n_heads=4, bias=bias, out_bias=bias, sliding_window=window), init_std=0.1)
  params = init(cfg, jax.random.key(0))
  new, new_cfg = slim_attention.convert(params, cfg)
  assert new_cfg.attention_pattern == ("slim_softmax",)
  assert "wv" not in new["layers"][0]["attn"]
  t = tokens()
  ref = apply(params, t, cfg)
  np.testing.assert_allclose(apply(new, t, new_cfg), ref, **TOL)
  np.testing.assert_allclose(cached_logits(new, new_cfg, t, prompt_len=4), ref, **TOL)  # 1-token
  np.testing.assert_allclose(cached_logits(new, new_cfg, t, prompt_len=3, chunk=4), ref, **TOL)
  cache = model.init_cache(new_cfg, 2, 16)
  assert set(cache["layers"][0]) == {"k"}
  index_bytes = 4  # the int32 write position
  assert (slim_attention.cache_bytes(new_cfg, 2, 16) - index_bytes) * 2 == (
      slim_attention.cache_bytes(cfg, 2, 16) - index_bytes)


def test_slim_rejects_bad_preconditions():
  gqa = tiny_config()  # n_kv_heads=2 < n_heads=4
  with pytest.raises(jb.ConfigError, match="n_kv_heads"):
    slim_attention.convert(init(gqa, jax.random.key(0)), gqa)
  qkn = tiny_config(attention=jb.AttentionConfig(n_heads=4, qk_norm="head"))
  with pytest.raises(jb.ConfigError, match="qk_norm"):
    slim_attention.convert(init(qkn, jax.random.key(0)), qkn)
  cfg = tiny_config(attention=jb.AttentionConfig(n_heads=4))
  params = init(cfg, jax.random.key(0))
  wk = params["layers"][0]["attn"]["wk"]
  params["layers"][0]["attn"]["wk"] = wk.at[:, :, 0, 0].set(0.0)  # singular W_K
  with pytest.raises(ValueError, match="condition number"):
    slim_attention.convert(params, cfg)
