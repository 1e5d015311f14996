"""``jaxblocks-compile``: compile the trainer's real train step ahead of time for a target.

    jaxblocks-compile --config configs/presets/v5e256_125m_fsdp.yaml            # target from file
    jaxblocks-compile --config configs/gpu_1b.yaml --devices 8 --chip h100      # simulated GPUs
    jaxblocks-compile --config X.yaml --topology v5p:4x4x4 model.n_layers=4     # any override

Targets: a Cloud TPU topology (``v5e:16x16``, ``v5p:4x4x4``, ``v6e:16x16`` or the slice names
``v5e-256``, ``v5p-128``, ``v6e-256``), compiled on CPU by the real TPU compiler from ``libtpu``
(``jax.experimental.topologies``; no TPU needed); or ``--devices N`` simulated host devices (the
shape of an N-GPU job; the memory check then uses ``--chip``). A preset names its target on a
comment line ``# jaxblocks-compile: --topology v5e:16x16``.

The program compiled is exactly the trainer's: the config is loaded and validated by
``train.config.load``, the state layout comes from ``train.loop.train_state_layout`` and the step
from ``train.step.jit_train_step(make_train_step(...))``, lowered with abstract arguments that
carry their shardings. The report gives per-device memory (arguments, outputs, temporaries,
generated code), FLOPs, and the collectives in the optimized HLO; the command fails (exit code 3)
when the step does not fit the chip's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
from typing import Any, Sequence

GIB = 1024 ** 3
# Per-chip accelerator memory in GiB, by JAX device kind (and by the short --chip names).
CHIP_MEMORY_GIB = {
    "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32,
    "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
    "h100": 80, "h200": 141, "a100-80gb": 80, "a100-40gb": 40, "b200": 180,
}
# Slice names (accelerator types) as Cloud TPU spells them → physical topology.
TOPOLOGY_ALIASES = {
    "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
    "v5litepod-256": "v5e:16x16", "v6e-64": "v6e:8x8", "v6e-256": "v6e:16x16",
    # v5p slice names count TensorCores (2 per chip).
    "v5p-8": "v5p:2x2x1", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:2x4x4", "v5p-128": "v5p:4x4x4",
    "v5p-256": "v5p:4x4x8",
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_TARGET_LINE = re.compile(r"^#\s*jaxblocks-compile:\s*(.+)$", re.M)


class DoesNotFitError(RuntimeError):
  """The compiler found that the train step does not fit the device memory."""


@dataclasses.dataclass
class Report:
  """What the compiler says about one train step."""

  target: str
  device_kind: str
  n_devices: int
  mesh: dict[str, int]
  rules: str
  n_params: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  flops: float | None
  collectives: dict[str, int]
  pallas_kernels: int
  chip_memory_bytes: int | None

  @property
  def peak_bytes(self) -> int:
    """Live bytes per device: arguments + outputs + temporaries, minus donated (aliased) buffers."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes + \
        self.code_bytes

  @property
  def fits(self) -> bool | None:
    return None if self.chip_memory_bytes is None else self.peak_bytes <= self.chip_memory_bytes

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["peak_bytes"] = self.peak_bytes
    d["fits"] = self.fits
    return d

  def format(self) -> str:
    g = lambda b: f"{b / GIB:8.3f} GiB"
    hbm = "unknown" if self.chip_memory_bytes is None else g(self.chip_memory_bytes).strip()
    lines = [
        f"target      {self.target}: {self.n_devices} x {self.device_kind} (memory {hbm})",
        f"mesh        {self.mesh} rules {self.rules}; {self.n_params / 1e6:.1f}M parameters",
        "per-device memory",
        f"  arguments   {g(self.argument_bytes)}",
        f"  outputs     {g(self.output_bytes)}",
        f"  aliased     {g(self.alias_bytes)}  (donated state reused for outputs)",
        f"  temporaries {g(self.temp_bytes)}",
        f"  code        {g(self.code_bytes)}",
        f"  peak        {g(self.peak_bytes)}"
        + ("" if self.fits is None else ("  fits" if self.fits else "  DOES NOT FIT")),
        "FLOPs per step per device: " + ("n/a" if self.flops is None else f"{self.flops:.4g}"),
        "collectives: " + ", ".join(f"{k} {v}" for k, v in self.collectives.items()),
        f"Pallas kernel calls: {self.pallas_kernels}",
    ]
    return "\n".join(lines)


def resolve_topology(name: str) -> str:
  """``v5e-256`` → ``v5e:16x16``; a ``kind:AxBxC`` name is returned unchanged."""
  if name in TOPOLOGY_ALIASES:
    return TOPOLOGY_ALIASES[name]
  if re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)+", name):
    return name
  raise ValueError(f"unknown TPU topology {name!r}: give kind:AxBxC (e.g. v5p:4x4x4) or one of "
                   f"{sorted(TOPOLOGY_ALIASES)}")


def tpu_devices(topology: str) -> list:
  """The devices of a TPU topology, for compilation on a machine without TPUs (needs libtpu)."""
  from jax.experimental import topologies
  try:
    with _libtpu_env():
      desc = topologies.get_topology_desc(topology_name=resolve_topology(topology),
                                          platform="tpu")
  except (RuntimeError, ValueError) as e:
    hint = "" if _has_libtpu() else " (libtpu is not installed: pip install libtpu)"
    raise RuntimeError(f"cannot build TPU topology {topology!r}: {e}{hint}") from None
  return list(desc.devices)


# libtpu otherwise looks for a TPU VM's metadata server and warns about it; compiling needs no
# exclusive hold of a TPU, so several compiles (test workers) may load libtpu at once.
_LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
               "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@contextlib.contextmanager
def _libtpu_env():
  """Sets the variables libtpu reads while it loads, and restores the environment afterwards so
  that no later child process takes them for a multi-host TPU launch."""
  added = [k for k in _LIBTPU_ENV if k not in os.environ]
  os.environ.update({k: _LIBTPU_ENV[k] for k in added})
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def _has_libtpu() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def count_collectives(hlo_text: str) -> dict[str, int]:
  """Number of each collective instruction in an HLO module (async ``-start`` halves counted once)."""
  counts = {}
  for op in COLLECTIVES:
    counts[op] = len(re.findall(rf"\s{re.escape(op)}(?:-start)?\(", hlo_text))
  return counts


def count_pallas_kernels(hlo_text: str) -> int:
  """Number of compiled Pallas (Mosaic TPU / Triton GPU) kernel calls in an HLO module."""
  return len(re.findall(r'custom_call_target="(?:tpu_custom_call|__gpu\$xla\.gpu\.triton)"',
                        hlo_text))


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def chip_memory_bytes(device_kind: str, chip: str | None = None,
                      memory_gib: float | None = None) -> int | None:
  """Memory per device: ``memory_gib`` if given, else the table entry for ``chip`` or the kind."""
  if memory_gib is not None:
    return int(memory_gib * GIB)
  key = chip or device_kind
  if key in CHIP_MEMORY_GIB:
    return int(CHIP_MEMORY_GIB[key] * GIB)
  if chip is not None:
    raise ValueError(f"unknown --chip {chip!r}; known: {sorted(CHIP_MEMORY_GIB)} (or give "
                     "--memory-gib)")
  return None


def build(cfg, devices: Sequence):
  """The trainer's mesh, rules, jitted train step and abstract ``(state, batch)`` on ``devices``.

  Returns ``(mesh, rules, specs, jitted_step, abstract_state, abstract_batch, state_shardings)``.
  """
  import jax
  import jax.numpy as jnp

  from jaxblocks import model as jb_model
  from jaxblocks import sharding as shd
  from jaxblocks.errors import ConfigError
  from train import loop, optim, step as step_lib

  cfg.mesh.check_devices(len(devices))
  mesh = shd.make_mesh(cfg.mesh.axis_sizes(), devices=devices)
  rules = shd.get_rules(cfg.mesh.rules)
  dp = cfg.mesh.data_parallel_size(mesh)
  micro = cfg.data.global_batch_size // cfg.optim.grad_accum_steps
  if micro % dp:
    raise ConfigError("data.global_batch_size", f"each micro-batch of {micro} sequences must "
                      f"split over the {dp}-way data-parallel mesh axes")
  specs = jb_model.specs(cfg.model)
  optimizer, lr_schedule = optim.make(cfg.optim, specs, cfg.train.steps)
  state_sh, abstract_state = loop.train_state_layout(specs, optimizer, cfg.model, mesh, rules)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(cfg.model, optimizer, lr_schedule,
                               grad_accum_steps=cfg.optim.grad_accum_steps,
                               z_loss=cfg.train.z_loss),
      state_sh, mesh, rules)
  bsh = step_lib.batch_sharding(mesh, rules)
  row = jax.ShapeDtypeStruct((cfg.data.global_batch_size, cfg.data.seq_len + 1), jnp.int32,
                             sharding=bsh)
  batch = {"tokens": row, "segment_ids": row, "positions": row}
  return mesh, rules, specs, train_step, abstract_state, batch, state_sh


def compile_train_step(cfg, devices: Sequence, *, target: str = "", chip: str | None = None,
                       memory_gib: float | None = None) -> Report:
  """Compile the train step of ``cfg`` for ``devices`` (present or from a TPU topology)."""
  from jaxblocks import params as P
  mesh, _, specs, train_step, abstract_state, batch, _ = build(cfg, devices)
  kind = devices[0].device_kind
  try:
    compiled = train_step.lower(abstract_state, batch).compile()
  except Exception as e:  # The TPU compiler itself refuses programs that exceed HBM.
    if "RESOURCE_EXHAUSTED" in str(e) or "HbmOom" in str(e):
      raise DoesNotFitError(f"{kind}: {str(e).splitlines()[0][:400]}") from None
    raise
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  return Report(
      target=target or f"{len(devices)} {devices[0].platform} devices", device_kind=kind,
      n_devices=len(devices), mesh={k: int(v) for k, v in mesh.shape.items()},
      rules=cfg.mesh.rules, n_params=P.count(specs),
      argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes), flops=_flops(compiled),
      collectives=count_collectives(hlo), pallas_kernels=count_pallas_kernels(hlo),
      chip_memory_bytes=chip_memory_bytes(kind, chip, memory_gib))


def _spec_json(sharding) -> list:
  spec = getattr(sharding, "spec", None)
  if spec is None:
    return []
  out = [list(e) if isinstance(e, tuple) else e for e in spec]
  while out and out[-1] is None:  # P("fsdp", None) and P("fsdp") are the same sharding
    out.pop()
  return out


def sharding_snapshot(cfg, devices: Sequence) -> dict[str, Any]:
  """Mesh, and the PartitionSpec of every parameter and optimizer-state leaf by tree path.

  Only abstract shapes are involved (the optimizer-state shardings come from compiling
  ``optimizer.init``, as in the trainer).
  """
  import jax
  mesh, _, _, _, abstract_state, _, state_sh = build(cfg, devices)

  def by_path(tree_sh, tree_abs):
    flat = jax.tree_util.tree_leaves_with_path(tree_abs)
    shs = jax.tree.leaves(tree_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return {jax.tree_util.keystr(p): {"shape": list(a.shape), "spec": _spec_json(s)}
            for (p, a), s in zip(flat, shs)}

  return {"mesh": {k: int(v) for k, v in mesh.shape.items()}, "rules": cfg.mesh.rules,
          "params": by_path(state_sh["params"], abstract_state["params"]),
          "opt_state": by_path(state_sh["opt_state"], abstract_state["opt_state"])}


def golden_path(config_path: str) -> str:
  """``tests/golden/<config file stem>.json`` in the repository holding this package."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  stem = os.path.splitext(os.path.basename(config_path))[0]
  return os.path.join(root, "tests", "golden", f"{stem}.json")


def target_args(config_path: str | None) -> list[str]:
  """The ``# jaxblocks-compile: ...`` arguments written in a config file (empty if none)."""
  if not config_path or not os.path.isfile(config_path):
    return []
  with open(config_path, encoding="utf-8") as f:
    m = _TARGET_LINE.search(f.read())
  return m.group(1).split() if m else []


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxblocks-compile", description=__doc__.split("\n\n")[0],
                              epilog="Overrides: any config key as key=value.")
  p.add_argument("--config", help="YAML config file")
  where = p.add_mutually_exclusive_group()
  where.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x4 or v5e-256 (needs libtpu)")
  where.add_argument("--devices", type=int, help="N simulated host devices (multi-GPU layout)")
  p.add_argument("--chip", help=f"chip whose memory to check against, one of "
                 f"{sorted(k for k in CHIP_MEMORY_GIB if ' ' not in k)}")
  p.add_argument("--memory-gib", type=float, help="memory per device to check against")
  p.add_argument("--json", help="also write the report as JSON to this file")
  p.add_argument("--update-golden", action="store_true",
                 help="write the parameter/optimizer-state sharding snapshot to "
                 "tests/golden/<config name>.json instead of compiling")
  return p


def main(argv: list[str] | None = None) -> int:
  """Entry point; returns the exit code (2: bad config/arguments, 3: does not fit)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = _parser()
  args, overrides = parser.parse_known_args(argv)
  if args.topology is None and args.devices is None:
    file_args, _ = parser.parse_known_args(target_args(args.config))
    args.topology, args.devices = file_args.topology, file_args.devices
    args.chip = args.chip or file_args.chip
  if args.topology is None and args.devices is None:
    parser.error("give --topology or --devices (or a '# jaxblocks-compile:' line in the config)")
  if args.devices is not None:
    if args.devices < 1:
      parser.error("--devices must be positive")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from jaxblocks.errors import ConfigError
  from train import config as config_lib
  try:
    cfg = config_lib.load(args.config, overrides)
    if args.topology is not None:
      devices, target = tpu_devices(args.topology), resolve_topology(args.topology)
    else:
      devices = jax.devices()[:args.devices]
      if len(devices) < args.devices:
        raise ValueError(f"--devices {args.devices}: JAX was already started with "
                         f"{len(jax.devices())} devices")
      target = f"{args.devices} simulated devices"
    chip_memory_bytes(devices[0].device_kind, args.chip, args.memory_gib)  # validate early
    if args.update_golden:
      path = golden_path(args.config)
      with open(path, "w", encoding="utf-8") as f:
        json.dump(sharding_snapshot(cfg, devices), f, indent=1, sort_keys=True)
        f.write("\n")
      print(f"wrote {path}")
      return 0
    report = compile_train_step(cfg, devices, target=target, chip=args.chip,
                                memory_gib=args.memory_gib)
  except DoesNotFitError as e:
    print(f"jaxblocks-compile: error: does not fit: {e}", file=sys.stderr)
    return 3
  except (ConfigError, ValueError, RuntimeError) as e:
    print(f"jaxblocks-compile: error: {e}", file=sys.stderr)
    return 2
  print(report.format())
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(report.to_dict(), f, indent=1)
  if report.fits is False:
    print(f"jaxblocks-compile: error: the train step needs {report.peak_bytes / GIB:.2f} GiB per "
          f"device but a {report.device_kind} has {report.chip_memory_bytes / GIB:.0f} GiB; shard "
          "more (mesh.fsdp / mesh.tensor), lower data.global_batch_size or raise "
          "optim.grad_accum_steps, or use model.remat=full", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
