"""``jaxblocks-convert``: Hugging Face checkpoints in and out of jaxblocks.

    jaxblocks-convert import HF_DIR [--output model.yaml]
        check a Hugging Face model directory (every tensor's presence and shape) and print the
        jaxblocks model config as YAML (a ``model:`` section for a training config); fine-tune
        it with ``jaxblocks-train --config cfg.yaml train.init_from=HF_DIR``.
    jaxblocks-convert export WORKDIR OUT_DIR --architecture LlamaForCausalLM [--step N]
        write the params of a training run's checkpoint (latest, or step N) as a Hugging Face
        model directory (config.json + safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="jaxblocks-convert", description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="check a Hugging Face directory, print its model config")
  imp.add_argument("hf_dir")
  imp.add_argument("--output", help="write the YAML here instead of stdout")
  exp = sub.add_parser("export", help="write a training run's params as a Hugging Face model")
  exp.add_argument("workdir", help="the run's train.workdir (holds checkpoints/)")
  exp.add_argument("out_dir")
  exp.add_argument("--architecture", required=True,
                   help="Hugging Face architecture, e.g. LlamaForCausalLM or GPT2LMHeadModel")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  return p


def _import(args) -> int:
  import yaml

  from jaxblocks.convert import hf
  cfg, arch = hf.inspect(args.hf_dir)
  text = (f"# {arch} from {args.hf_dir}; train with train.init_from={args.hf_dir}\n"
          + yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
  if args.output:
    with open(args.output, "w") as f:
      f.write(text)
  else:
    sys.stdout.write(text)
  return 0


def _export(args) -> int:
  import jax
  import orbax.checkpoint as ocp

  from jaxblocks import model as model_lib
  from jaxblocks import params as P
  from jaxblocks.config import ModelConfig
  from jaxblocks.convert import hf

  ckpt_dir = os.path.abspath(os.path.join(args.workdir, "checkpoints"))
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoints (is {args.workdir} a train.workdir?)")
  with ocp.CheckpointManager(ckpt_dir) as mgr:
    step = mgr.latest_step() if args.step is None else args.step
    if step is None or step not in mgr.all_steps():
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint at step {args.step or 'latest'} "
                              f"(available: {sorted(mgr.all_steps())})")
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    cfg = ModelConfig.from_dict(meta["config"]["model"]).validate()
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype or cfg.weight_dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        model_lib.specs(cfg), is_leaf=P.is_spec)
    params = mgr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))["params"]
  files = hf.save(hf.HFModel(cfg, params, args.architecture), args.out_dir, dtype=args.dtype)
  print(f"wrote {args.out_dir} ({args.architecture}, step {step}): config.json, {', '.join(files)}")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Entry point; returns the process exit code."""
  args = _parser().parse_args(argv)
  from jaxblocks.convert import CheckpointError, UnsupportedError
  from jaxblocks.errors import ConfigError
  try:
    return _import(args) if args.command == "import" else _export(args)
  except (CheckpointError, UnsupportedError, ConfigError, FileNotFoundError) as e:
    print(f"jaxblocks-convert: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
