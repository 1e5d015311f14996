"""GLA kernels under shard_map on 8 simulated devices: batch/head sharding and context (sequence)
parallelism equal the single-device reference, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxblocks import sharding as S
from jaxblocks.attention import linear_ops
from jaxblocks.kernels.gla import api
from tests.kernels.test_gla_kernels import FAST_COMPILE, make_case


def _loss(fn, seg, do, dfinal):
  def loss(q, k, v, g, s0):
    o, final = fn(q, k, v, g, s0, seg)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(final * dfinal)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))


def test_context_parallel_equals_single_device():
  """``cp`` preset on a data×sequence×tensor = 2×2×2 mesh: the sequence split in two with a
  document crossing the split and one starting exactly at it; heads split over tensor."""
  assert jax.device_count() >= 8
  args, _, (do, dfinal) = make_case(4, 2, 64, 4, 2, 16, 16, "key", "normal", jnp.float32, False)
  seg = jnp.array([[0] * 10 + [1] * 6 + [2] * 30 + [3] * 18, [0] * 32 + [1] * 32])
  want_val, want_grads = jax.jit(_loss(
      lambda q, k, v, g, s0, seg: linear_ops.recurrent_gla(q, k, v, g, initial_state=s0,
                                                           segment_ids=seg),
      seg, do, dfinal))(*args)
  mesh = S.make_mesh({"data": 2, "sequence": 2, "tensor": 2})
  with S.use_rules(mesh, "cp"):
    fn = jax.jit(_loss(lambda q, k, v, g, s0, seg: api.chunk_gla(
        q, k, v, g, initial_state=s0, segment_ids=seg, chunk_size=16, sub_chunk=8,
        impl="pallas", interpret=True), seg, do, dfinal))
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    got_val, got_grads = fn.trace(*args).lower().compile(FAST_COMPILE)(*args)
  assert jaxpr.count("shard_map") >= 2 and "all_gather" in jaxpr, "must run per shard"
  np.testing.assert_allclose(got_val, want_val, rtol=1e-5)
  for name, got, want in zip(("q", "k", "v", "log_g", "initial_state"), got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4,
                               err_msg=f"d{name}")
