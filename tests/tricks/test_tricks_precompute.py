import jax
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import model
from jaxblocks.tricks import precompute_first_layer as pfl
from tests.helpers import tiny_config, tokens
from tests.tricks.tricks_helpers import apply, init, cached_logits


@pytest.mark.parametrize("topology,tie,shared", [
    pytest.param("parallel", True, False, marks=pytest.mark.slow),
    # parallel blocks also run against transformers (imported Pythia) in tests/convert
    pytest.param("parallel", False, True, marks=pytest.mark.slow),
    ("pre", True, False)])
def test_precomputed_model_matches_original(topology, tie, shared):
  cfg = tiny_config(n_layers=3, tie_embeddings=tie, scale_embeddings=True,
                    block=jb.BlockConfig(topology=topology, parallel_shared_norm=shared),
                    attention=jb.AttentionConfig(n_heads=4, n_kv_heads=2, qk_norm="head",
                                                 bias=True, out_bias=True))
  params = init(cfg, jax.random.key(0))
  new, new_cfg = pfl.convert(params, cfg)
  assert new_cfg.precomputed_first_layer
  assert "wq" not in new["first_layer"]["attn"] and new["layers"][0]["attn"]["wq"].shape[0] == 2
  t = tokens()
  ref = apply(params, t, cfg)
  np.testing.assert_allclose(apply(new, t, new_cfg), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(apply(new, t, new_cfg.replace(scan_layers=False)), ref,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached_logits(new, new_cfg, t, prompt_len=5), ref, rtol=1e-5,
                             atol=1e-5)
  prompt = t[:, :4]
  np.testing.assert_array_equal(
      model.generate(new, prompt, new_cfg, max_new_tokens=5, temperature=0.0),
      model.generate(params, prompt, cfg, max_new_tokens=5, temperature=0.0))


def test_memory_tradeoff_formula_matches_measured_bytes():
  cfg = tiny_config(n_layers=2, block=jb.BlockConfig(topology="parallel"), tie_embeddings=False)
  params = init(cfg, jax.random.key(0))
  new, new_cfg = pfl.convert(params, cfg)
  report = pfl.memory_tradeoff(cfg, params, new)
  d, e = cfg.d_model, 2 * cfg.attention.dim(cfg.d_model)  # n_kv = 2
  assert report["table_values_per_token"] == 2 * (d + e)
  assert report["measured_bytes_added"] == 4 * report["net_values_added"]
  assert model.count_params(new_cfg) - model.count_params(cfg) == report["net_values_added"]


def test_preconditions_raise_clear_errors():
  learned = tiny_config(position_embedding="learned")
  with pytest.raises(jb.ConfigError, match="position_embedding"):
    pfl.convert(init(learned, jax.random.key(0)), learned)
  for bad, key in [(dict(block=jb.BlockConfig(topology="sas")), "topology"),
                   (dict(n_layers=1), "n_layers")]:
    with pytest.raises(jb.ConfigError, match=key):
      pfl.check_config(tiny_config(**bad))
  cfg = tiny_config()
  new, new_cfg = pfl.convert(init(cfg, jax.random.key(0)), cfg)
  with pytest.raises(ValueError, match="already"):
    pfl.convert(new, new_cfg)
