"""``DistributedConfig``: multi-process (multi-host) start-up through ``jax.distributed``."""

from __future__ import annotations

import dataclasses
import os

import jax

from jaxblocks.errors import ConfigError, check_choice, check_int

MODES = ("auto", "on", "off")
# Environment variables that mark a multi-process launcher jax.distributed can read itself.
_LAUNCHER_HINTS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS",
                   "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")
# Every variable the launcher check reads.
LAUNCHER_VARS = (*_LAUNCHER_HINTS, "SLURM_NTASKS")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """``mode``: ``auto`` initialises ``jax.distributed`` when a coordinator is given or a
  multi-process launcher (Cloud TPU pod, SLURM with several tasks, Open MPI) is detected;
  ``on`` always, ``off`` never. ``coordinator_address`` (``host:port``), ``num_processes`` and
  ``process_id`` are the explicit flags for a hand-started run."""

  mode: str = "auto"
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1
  cpu_collectives: str = "gloo"

  def validate(self, prefix: str = "distributed") -> "DistributedConfig":
    check_choice(f"{prefix}.mode", self.mode, MODES)
    check_int(f"{prefix}.num_processes", self.num_processes, minimum=0)
    check_int(f"{prefix}.process_id", self.process_id, minimum=-1)
    check_choice(f"{prefix}.cpu_collectives", self.cpu_collectives, ("gloo", "mpi", "none"))
    explicit = (bool(self.coordinator_address), self.num_processes > 0, self.process_id >= 0)
    if any(explicit) and not all(explicit):
      raise ConfigError(f"{prefix}.coordinator_address", "coordinator_address, num_processes "
                        "and process_id must be given together")
    if all(explicit) and self.process_id >= self.num_processes:
      raise ConfigError(f"{prefix}.process_id", f"{self.process_id} must be < num_processes="
                        f"{self.num_processes}")
    if self.mode == "off" and self.coordinator_address:
      raise ConfigError(f"{prefix}.mode", "is 'off' but a coordinator_address is given")
    return self


def _launcher_detected() -> bool:
  if os.environ.get("SLURM_NTASKS", "1") not in ("", "1"):
    return True
  if os.environ.get("OMPI_COMM_WORLD_SIZE", "1") not in ("", "1"):
    return True
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:  # a single-host TPU VM (or a local libtpu compile) lists one host
    return True
  return any(os.environ.get(k) for k in _LAUNCHER_HINTS
             if k not in ("OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"))


def initialize(cfg: DistributedConfig) -> bool:
  """Start ``jax.distributed`` when configured or launched so; returns whether it did.

  Must run before any other JAX call touches the backend.
  """
  explicit = bool(cfg.coordinator_address)
  if cfg.mode == "off" or (cfg.mode == "auto" and not explicit and not _launcher_detected()):
    return False
  if cfg.cpu_collectives != "none":
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  if explicit:
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address,
                               num_processes=cfg.num_processes, process_id=cfg.process_id)
  else:
    jax.distributed.initialize()
  return True
