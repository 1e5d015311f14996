import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import blocks, model
from jaxblocks import params as P
from jaxblocks.config import LayerTyingConfig
from tests.helpers import tiny_config, tokens
from tests.tricks.tricks_helpers import apply, init, cached_logits, perturb


def _cfg(k, rank=0, pattern=("softmax",), n_layers=5):
  return tiny_config(n_layers=n_layers, attention_pattern=pattern,
                     layer_tying=LayerTyingConfig(unique_layers=k, lora_rank=rank))


def test_tied_parameter_count():
  base = _cfg(None, n_layers=6)
  layer = P.count(blocks.specs(base, "softmax"))
  shared = model.count_params(base) - 6 * layer
  assert model.count_params(_cfg(2, n_layers=6)) == shared + 2 * layer
  d, f, r = base.d_model, base.mlp.hidden(base.d_model), 3
  a, h = base.attention, base.attention.dim(d)
  per_layer_lora = r * ((d + a.n_heads * h) * 2 + (d + a.kv_heads() * h) * 2 + (d + f) * 3)
  assert model.count_params(_cfg(2, r, n_layers=6)) == shared + 2 * layer + 6 * per_layer_lora


def _untie(params, cfg):
  """The equivalent untied parameters: layer l gets set l % K plus its LoRA delta."""
  sets = cfg.layer_tying.unique_layers // cfg.period
  layers = []
  for i, stack in enumerate(params["layers"]):
    per = []
    for r in range(cfg.repeats):
      block = jax.tree.map(lambda a: a[r % sets], stack)
      if "layer_lora" in params:
        lora = jax.tree.map(lambda a: a[r], params["layer_lora"][i])
        flat = P.flatten_dict(block)
        for path, ab in lora.items():
          flat[path] = flat[path] + jnp.tensordot(ab["a"], ab["b"], axes=1)
        block = jax.tree_util.tree_map_with_path(
            lambda p, _: flat[jax.tree_util.keystr(p, simple=True, separator="/")], block)
      per.append(block)
    layers.append(jax.tree.map(lambda *a: jnp.stack(a), *per))
  out = {k: v for k, v in params.items() if k not in ("layers", "layer_lora")}
  out["layers"] = layers
  return out


@pytest.mark.parametrize("k,rank,pattern,n", [
    (2, 0, ("softmax",), 5), (1, 2, ("softmax",), 3),
    pytest.param(2, 2, ("softmax", "softmax"), 6, marks=pytest.mark.slow)])
def test_tied_model_equals_untied_copies(k, rank, pattern, n):
  cfg = _cfg(k, rank, pattern, n)
  params = init(cfg, jax.random.key(0))
  if rank:
    params = perturb(params, 1)  # non-zero B
  untied_cfg = cfg.replace(layer_tying=LayerTyingConfig())
  t = tokens()
  ref = apply(_untie(params, cfg), t, untied_cfg)
  for scan in (True, False):
    np.testing.assert_allclose(apply(params, t, cfg.replace(scan_layers=scan)), ref,
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cached_logits(params, cfg, t, prompt_len=6), ref, rtol=1e-5,
                             atol=1e-5)


def test_lora_b_starts_at_zero_and_learns():
  cfg = _cfg(1, 2, n_layers=3)
  params = init(cfg, jax.random.key(0))
  lora = params["layer_lora"][0]
  assert all(not np.any(ab["b"]) for ab in lora.values())
  t = tokens()
  g = jax.jit(jax.grad(lambda p: jnp.mean(jax.nn.log_softmax(apply(p, t, cfg))[..., 0])))(params)
  assert float(jnp.abs(g["layer_lora"][0]["mlp/w_up"]["b"]).sum()) > 0


def test_tying_bad_configs():
  with pytest.raises(jb.ConfigError, match="unique_layers"):
    _cfg(7, n_layers=5)
  with pytest.raises(jb.ConfigError, match="unique_layers"):
    _cfg(3, pattern=("softmax", "softmax"), n_layers=6)
  with pytest.raises(jb.ConfigError, match="lora_rank"):
    _cfg(None, 2)
