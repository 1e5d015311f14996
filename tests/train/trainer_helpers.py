"""Shared pieces of the trainer tests: a tiny config and subprocess runs of ``python -m train``."""

import os
import pathlib
import subprocess
import sys
import time

import numpy as np

from train import distributed

REPO = pathlib.Path(__file__).resolve().parents[2]

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.max_seq_len=64", "model.attention.n_heads=2",
    "model.mlp.d_ff=64", "data.seq_len=32", "data.global_batch_size=8", "data.prefetch=0",
    "optim.lr=3e-3", "optim.warmup_steps=2", "logging.every_steps=1", "logging.tensorboard=false",
    "train.eval_every=0", "train.eval_batches=1", "train.sample_tokens=0", "mesh.rules=dp",
]


def env(devices: int = 1, cache_dir: str | None = None) -> dict:
  e = dict(os.environ)
  for k in distributed.LAUNCHER_VARS:  # a child must never take the test run for a launcher
    e.pop(k, None)
  e["PYTHONPATH"] = str(REPO)
  e["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  e["JAX_PLATFORMS"] = "cpu"
  if cache_dir:
    e["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return e


def start(args, devices=1, cache_dir=None) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "train", *TINY, *args], cwd=REPO,
                          env=env(devices, cache_dir), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def run(args, devices=1, cache_dir=None, timeout=240) -> str:
  p = start(args, devices, cache_dir)
  out, _ = p.communicate(timeout=timeout)
  assert p.returncode == 0, out[-3000:]
  return out


def saved_steps(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.exists():
    return []
  return sorted(int(p.name) for p in d.iterdir()
                if p.name.isdigit() and (p / "commit_success.txt").exists())


def wait_for_checkpoint(proc, workdir, min_step, timeout=180) -> int:
  t0 = time.time()
  while time.time() - t0 < timeout:
    steps = [s for s in saved_steps(workdir) if s >= min_step]
    if steps:
      return steps[0]
    if proc.poll() is not None:
      raise AssertionError("run ended before its first checkpoint:\n" + proc.stdout.read()[-3000:])
    time.sleep(0.02)
  raise AssertionError("no checkpoint appeared")


def final_params(workdir) -> tuple[int, dict]:
  """Step and parameters of the newest checkpoint (restored onto one device), as numpy."""
  import jax
  import orbax.checkpoint as ocp
  step = saved_steps(workdir)[-1]
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "params"
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), meta)
  restored = ckptr.restore(path, target)
  ckptr.close()
  flat = jax.tree_util.tree_leaves_with_path(restored)
  return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def losses(workdir) -> dict[int, float]:
  import json
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["split"] == "train":
      out[row["step"]] = row["loss"]
  return out
