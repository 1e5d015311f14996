import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxblocks as jb
from jaxblocks import blocks, model, norms
from jaxblocks.attention import softmax
from jaxblocks.context import Context
from tests.helpers import tiny_config, tokens
from tests.tricks.tricks_helpers import init, cached_logits, perturb


def _cfg(topology, size=4, **kw):
  return tiny_config(n_layers=3, block=jb.BlockConfig(topology=topology, attnres_block_size=size),
                     **kw)


def test_zero_query_mix_is_uniform_average():
  src = jax.random.normal(jax.random.key(0), (5, 2, 3, 8))
  for n_valid in (1, 3, 5):
    out = blocks.attnres_mix(jnp.zeros(8), src, n_valid)
    np.testing.assert_allclose(out, src[:n_valid].mean(0), rtol=1e-5, atol=1e-6)


def _reference(params, t, cfg, size):
  """Python-list AttnRes: sources are the embedding and block sums of sublayer outputs."""
  x = model.embed(params, t, cfg, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape))
  ctx = Context(positions=jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape))
  done, partial, count = [x], None, 0

  def mix(query):
    srcs = done + ([] if partial is None else [partial])
    v = jnp.stack(srcs)
    w = jax.nn.softmax(jnp.einsum("sbtd,d->sbt", norms.rms_normalize(v, 1e-6), query), axis=0)
    return jnp.einsum("sbt,sbtd->btd", w, v)

  for l in range(cfg.n_layers):
    p = jax.tree.map(lambda a: a[l], params["layers"][0])
    for name in ("attn", "mlp"):
      h = norms.apply(p[f"{name}_norm"], mix(p[f"{name}_query"]), cfg.norm)
      out = softmax.apply(p["attn"], h, cfg.attention, ctx)[0] if name == "attn" else \
          blocks.mlp_sublayer(p["mlp"], h, cfg)
      partial = out if partial is None else partial + out
      count += 1
      if count % size == 0:
        done, partial = done + [partial], None
  h = mix(params["topology"]["attnres_out_query"])
  return model.head(params, h, cfg)


@pytest.mark.parametrize("topology,size,zero_queries", [
    pytest.param("attnres", 1, True, marks=pytest.mark.slow),
    pytest.param("attnres", 1, False, marks=pytest.mark.slow), ("attnres_block", 3, False)])
def test_attnres_matches_reference(topology, size, zero_queries):
  cfg = _cfg(topology, size)
  params = init(cfg, jax.random.key(0))
  if not zero_queries:
    params = perturb(params, 1, 0.3)
  assert blocks.attnres_n_sources(cfg) == 1 + -(-6 // size)
  t = tokens()
  ref = jax.jit(_reference, static_argnums=(2, 3))(params, t, cfg, size)
  for scan in (True, False):
    np.testing.assert_allclose(jax.jit(model.apply, static_argnums=2)(
        params, t, cfg.replace(scan_layers=scan)), ref, rtol=1e-4, atol=1e-4)
  if not zero_queries:
    np.testing.assert_allclose(cached_logits(params, cfg, t, prompt_len=5, chunk=2), ref,
                               rtol=1e-4, atol=1e-4)


def test_attnres_gradients_reach_queries_and_remat():
  cfg = _cfg("attnres_block", 2, remat="full")
  params = init(cfg, jax.random.key(0))
  t = tokens()
  loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply(p, t, cfg))[..., 0])
  g = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(g["layers"][0]["attn_query"]).sum()) > 0
  assert float(jnp.abs(g["topology"]["attnres_out_query"]).sum()) > 0


def test_attnres_bad_block_size():
  with pytest.raises(jb.ConfigError, match="attnres_block_size"):
    _cfg("attnres_block", 0)
