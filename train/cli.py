"""``jaxblocks-train`` / ``python -m train``: train from a YAML config plus dotted overrides.

    jaxblocks-train --config configs/tiny.yaml
    jaxblocks-train --config configs/tiny.yaml model.n_layers=4 optim.lr=1e-3 train.workdir=runs/x

Multi-process: under a launcher (Cloud TPU pod, SLURM, Open MPI) ``jax.distributed`` starts by
itself; by hand pass ``distributed.coordinator_address=host:port distributed.num_processes=N
distributed.process_id=I`` to every process.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxblocks.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxblocks-train", description=__doc__.split("\n\n")[0],
                              epilog="Overrides: any config key as key=value, e.g. "
                              "model.n_layers=4 data.seq_len=256 optim.name=lion.")
  p.add_argument("--config", help="YAML config file (default: built-in defaults)")
  p.add_argument("--print-config", action="store_true",
                 help="print the resolved config as YAML and exit")
  return p


def main(argv: list[str] | None = None) -> int:
  """Entry point; returns the process exit code."""
  args, overrides = _parser().parse_known_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  from train import config as config_lib
  try:
    cfg = config_lib.load(args.config, overrides)
  except ConfigError as e:
    print(f"jaxblocks-train: error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    import yaml
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0
  from train import distributed
  distributed.initialize(cfg.distributed)
  from train import loop
  try:
    loop.run(cfg)
  except ConfigError as e:
    print(f"jaxblocks-train: error: {e}", file=sys.stderr)
    return 2
  except loop.NonFiniteError as e:
    print(f"jaxblocks-train: stopped: {e}", file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  sys.exit(main())
