import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks import params as P
from jaxblocks import sharding


def _specs():
  return {
      "w": P.ParamSpec((8, 16), ("embed", "mlp"), P.normal(0.02)),
      "b": P.ParamSpec((16,), ("mlp",), P.zeros),
      "nested": {"g": P.ParamSpec((8,), ("norm",), P.ones)},
  }


def test_count_and_abstract():
  s = _specs()
  assert P.count(s) == 8 * 16 + 16 + 8
  a = P.abstract(s)
  assert a["w"].shape == (8, 16) and a["w"].dtype == jnp.float32


def test_init_values_and_determinism():
  s = _specs()
  p1 = P.init(s, jax.random.key(0))
  p2 = P.init(s, jax.random.key(0))
  chex.assert_trees_all_equal(p1, p2)
  np.testing.assert_array_equal(p1["b"], 0.0)
  np.testing.assert_array_equal(p1["nested"]["g"], 1.0)
  assert 0.01 < float(jnp.std(p1["w"])) < 0.03


def test_leaf_keys_independent_of_other_leaves():
  s = _specs()
  s2 = dict(s, extra=P.ParamSpec((3,), (None,), P.normal(1.0)))
  p1, p2 = P.init(s, jax.random.key(3)), P.init(s2, jax.random.key(3))
  np.testing.assert_array_equal(p1["w"], p2["w"])


def test_stack_gives_distinct_layers():
  st = P.stack(_specs(), 3)
  assert st["w"].shape == (3, 8, 16) and st["w"].logical_axes == ("layers", "embed", "mlp")
  p = P.init(st, jax.random.key(0))
  assert not np.allclose(p["w"][0], p["w"][1])


def test_init_with_mesh_places_shards():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  p = P.init(_specs(), jax.random.key(0), mesh, "fsdp_tp")
  assert p["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert p["w"].addressable_shards[0].data.shape == (2, 8)
  unsharded = P.init(_specs(), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(unsharded["w"]))


def test_spec_validation():
  with pytest.raises(ValueError, match="logical_axes"):
    P.ParamSpec((2, 3), ("embed",), P.zeros)
  with pytest.raises(ValueError, match="positive"):
    P.ParamSpec((0, 3), ("embed", None), P.zeros)


def test_check_tree_reports_path():
  s = _specs()
  p = P.init(s, jax.random.key(0))
  p["w"] = jnp.zeros((8, 15))
  with pytest.raises(ValueError, match="w: expected shape"):
    P.check_tree(p, s)
