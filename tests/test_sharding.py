import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

from jaxblocks import sharding


def test_make_mesh_fills_rest():
  mesh = sharding.make_mesh({"data": 2, "fsdp": -1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "sequence": 1, "tensor": 1}


@pytest.mark.parametrize("sizes, msg", [
    ({"data": 3}, "multiply"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"model": 2}, "unknown mesh axis"),
    ({"data": 0}, "invalid size"),
])
def test_make_mesh_errors(sizes, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.make_mesh(sizes)


def test_logical_to_spec_presets():
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), "fsdp_tp", mesh, (32, 4, 8))
  assert spec == PS("fsdp", "tensor")
  # A mesh axis is used once per array: batch takes fsdp, so embed stays replicated.
  spec = sharding.logical_to_spec(("batch", "seq", "embed"), "fsdp", mesh, (8, 4, 32))
  assert spec == PS("fsdp")
  # Indivisible dimensions stay replicated.
  spec = sharding.logical_to_spec(("heads",), "fsdp_tp", mesh, (3,))
  assert spec == PS()


def test_unknown_preset_and_rule_axis():
  with pytest.raises(ValueError, match="unknown sharding preset"):
    sharding.get_rules("zero3")
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding.Rules({"embed": "model"})


def test_constrain_noop_outside_and_applied_inside():
  x = jnp.ones((8, 4, 16))
  assert sharding.constrain(x, ("batch", "seq", "embed")) is x
  mesh = sharding.make_mesh({"data": 8})

  @jax.jit
  def f(x):
    with sharding.use_rules(mesh, "dp"):
      return sharding.constrain(x * 2, ("batch", "seq", "embed"))

  y = f(x)
  assert y.sharding.spec == PS("data")
  np.testing.assert_array_equal(y, 2.0)
  with pytest.raises(ValueError, match="logical axes"):
    with sharding.use_rules(mesh, "dp"):
      sharding.constrain(x, ("batch", "seq"))
