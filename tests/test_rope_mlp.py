import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks import mlp, params as P, rope


def test_rope_preserves_norm_and_relative_positions():
  x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
  pos = jnp.arange(6)[None]
  y = rope.apply_rope(x, pos)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  # q·k depends only on the position difference.
  q, k = x[:, :1, :1], x[:, 1:2, :1]
  def dot(pq, pk):
    return jnp.sum(rope.apply_rope(q, jnp.array([[pq]])) * rope.apply_rope(k, jnp.array([[pk]])))
  np.testing.assert_allclose(dot(3, 1), dot(10, 8), rtol=1e-4)


def test_partial_rotary_leaves_tail_untouched():
  x = jax.random.normal(jax.random.key(0), (1, 4, 1, 8))
  y = rope.apply_rope(x, jnp.arange(4)[None] + 5, fraction=0.5)
  np.testing.assert_array_equal(y[..., 4:], x[..., 4:])
  assert not np.allclose(y[..., :4], x[..., :4])


def test_rope_shape_errors():
  with pytest.raises(ValueError, match="positions shape"):
    rope.apply_rope(jnp.ones((1, 4, 1, 8)), jnp.arange(3)[None])


@pytest.mark.parametrize("kind", sorted(mlp.KINDS))
def test_mlp_kinds_match_manual(kind):
  cfg = mlp.MlpConfig(kind=kind, d_ff=12, bias=True)
  p = P.init(mlp.specs(8, cfg), jax.random.key(0))
  p = jax.tree.map(lambda a: a + 0.1, p)
  x = jax.random.normal(jax.random.key(1), (2, 3, 8))
  act_name, gated = mlp.KINDS[kind]
  act = mlp.ACTIVATIONS[act_name]
  h = x @ p["w_up"] + p["b_up"]
  h = act(x @ p["w_gate"] + p["b_gate"]) * h if gated else act(h)
  np.testing.assert_allclose(mlp.apply(p, x, cfg), h @ p["w_down"] + p["b_down"], rtol=1e-5, atol=1e-6)
