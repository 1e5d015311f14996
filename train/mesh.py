"""``MeshConfig``: named mesh axis sizes and a logical-axis rules preset."""

from __future__ import annotations

import dataclasses
import math

import jax

from jaxblocks import sharding as shd
from jaxblocks.errors import ConfigError, check_choice


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh: sizes of the ``data``, ``fsdp``, ``sequence`` and ``tensor`` axes (one of them
  may be -1, "all remaining devices") and the sharding-rules preset (``dp``, ``fsdp``,
  ``fsdp_tp``, ``sp``)."""

  data: int = -1
  fsdp: int = 1
  sequence: int = 1
  tensor: int = 1
  rules: str = "fsdp"

  def axis_sizes(self) -> dict[str, int]:
    return {a: getattr(self, a) for a in shd.MESH_AXES}

  def validate(self, prefix: str = "mesh") -> "MeshConfig":
    check_choice(f"{prefix}.rules", self.rules, sorted(shd.PRESETS))
    sizes = self.axis_sizes()
    for a, s in sizes.items():
      if not isinstance(s, int) or isinstance(s, bool) or s == 0 or s < -1:
        raise ConfigError(f"{prefix}.{a}", f"must be a positive integer or -1, got {s!r}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
      raise ConfigError(f"{prefix}.{free[1]}", f"only one mesh axis may be -1, got {free}")
    return self

  def check_devices(self, n_devices: int, prefix: str = "mesh") -> None:
    """Fail before compilation when the mesh does not fit ``n_devices``."""
    sizes = self.axis_sizes()
    fixed = math.prod(s for s in sizes.values() if s != -1)
    free = [a for a, s in sizes.items() if s == -1]
    if (free and n_devices % fixed) or (not free and fixed != n_devices):
      raise ConfigError(prefix, f"axis sizes {sizes} do not fit the {n_devices} available "
                        "devices")

  def make(self) -> jax.sharding.Mesh:
    self.check_devices(jax.device_count())
    return shd.make_mesh(self.axis_sizes())

  def data_parallel_size(self, mesh: jax.sharding.Mesh) -> int:
    """Number of ways the batch dimension is split under these rules."""
    axes = shd.get_rules(self.rules).get("batch")
    return math.prod(mesh.shape[a] for a in axes)
