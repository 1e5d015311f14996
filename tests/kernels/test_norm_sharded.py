"""Fused norm kernels under shard_map on 8 simulated devices equal the unsharded reference."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxblocks import sharding as S
from jaxblocks.kernels.norm import api, reference

N_DEVICES = 8


def _loss(fn, dy, dr):
  def loss(x, r, w, b, g):
    y, new_res = fn(x, r, w, b, g)
    return (jnp.sum(y.astype(jnp.float32) * dy) + jnp.sum(new_res.astype(jnp.float32) * dr))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def check_sharded():
  """Rows split over data/fsdp/sequence; weights replicated (dp) or sharded on embed (sp)."""
  assert jax.device_count() >= N_DEVICES
  keys = jax.random.split(jax.random.PRNGKey(0), 7)
  shape, d = (4, 6, 256), 256
  x = jax.random.normal(keys[0], shape, jnp.float32)
  r = jax.random.normal(keys[1], shape, jnp.float32)
  w = 1.0 + 0.1 * jax.random.normal(keys[2], (d,))
  b = 0.1 * jax.random.normal(keys[3], (d,))
  g = jax.random.normal(keys[4], shape, jnp.float32)
  dy = jax.random.normal(keys[5], shape)
  dr = jax.random.normal(keys[6], shape)
  for backend, kind, preset, mesh_axes in (
      ("tpu", "rms", "sp", {"data": 2, "fsdp": 2, "sequence": 2}),
      ("gpu", "layer", "dp", {"data": 4, "fsdp": 2})):
    mesh = S.make_mesh(mesh_axes)
    want_val, want_grads = _loss(
        lambda *a: reference.fused_add_norm(*a[:4], gate=a[4], kind=kind, eps=1e-5), dy, dr)(
            x, r, w, b, g)
    rows = S.named_sharding(("batch", "seq", "embed"), mesh, preset, shape)
    vec = S.named_sharding(("embed",), mesh, preset, (d,))  # fsdp-sharded weights under "sp"
    placed = [jax.device_put(a, s) for a, s in ((x, rows), (r, rows), (w, vec), (b, vec),
                                                (g, rows))]
    with S.use_rules(mesh, preset):
      fused = _loss(lambda *a: api.fused_add_norm(*a[:4], gate=a[4], kind=kind, eps=1e-5,
                                                  impl="pallas", backend=backend,
                                                  interpret=True), dy, dr)
      jaxpr = str(jax.make_jaxpr(fused)(*placed))
      got_val, got_grads = fused(*placed)
    assert jaxpr.count("shard_map") >= 2 and "psum" in jaxpr, "kernels must run per shard"
    np.testing.assert_allclose(got_val, want_val, rtol=1e-5)
    for name, got, want in zip(("x", "residual", "weight", "bias", "gate"), got_grads,
                               want_grads):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4,
                                 err_msg=f"{backend}/{preset}: d{name}")


def test_sharded_equals_unsharded():
  if jax.device_count() >= N_DEVICES:
    check_sharded()
    return
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                    f" --xla_force_host_platform_device_count={N_DEVICES}"),
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


if __name__ == "__main__":
  check_sharded()
