"""Benchmark: fused residual-add + RMSNorm / LayerNorm, Pallas kernel vs XLA vs jax's Pallas ops.

For each (tokens x d) shape, bfloat16, ``(y, new_residual) = fused_add_norm(x, residual, w[, b])``:
forward, forward+backward, and backward (= the difference) times, each as achieved bandwidth
relative to a device-to-device copy measured in the same run. Minimum traffic counted: forward
reads x, residual and writes y, new_residual; backward reads the stream, dy, d_new_residual and
writes dx (= d_residual); weights and row statistics are ignored.

    python benchmarks/norm_kernels.py                 # accelerator: 4K x 1K ... 64K x 8K
    python benchmarks/norm_kernels.py --small         # CPU-sized shapes, XLA only

Prints a table and writes JSON (device, date, rows) to ``benchmarks/results/``. Pallas columns are
``n/a`` on CPU (interpret mode would time the interpreter, not a kernel).
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp

from jaxblocks.kernels.norm import api
from measure import median_seconds, write_json

LARGE_SHAPES = [(4096, 1024), (4096, 4096), (16384, 2048), (16384, 4096), (32768, 4096),
                (65536, 4096), (65536, 8192)]
SMALL_SHAPES = [(512, 256), (1024, 512), (2048, 1024)]


def _time(fn, *args, iters: int) -> float:
  return median_seconds(fn, *args, iters=iters, warmup=2)


def copy_bandwidth(n_bytes: int, iters: int) -> float:
  """Bytes/s of a device-to-device copy (read + write) of an ``n_bytes`` buffer."""
  a = jnp.ones((n_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda v: v.copy())
  return 2 * n_bytes / _time(copy, a, iters=iters)


def _jax_pallas_ops(kind):
  """jax's own Pallas GPU norm (no fused residual add: the add runs in XLA), or None."""
  try:
    if kind == "rms":
      from jax.experimental.pallas.ops.gpu.rms_norm import rms_norm as op
    else:
      from jax.experimental.pallas.ops.gpu.layer_norm import layer_norm as op
  except Exception:  # noqa: BLE001 - optional comparison, any import problem means "absent"
    return None
  return op


def _fns(kind, impl_name, eps=1e-6):
  """(forward, forward+backward) jitted functions of (x, r, w, b, dy, dr) for one impl."""
  if impl_name == "jax_pallas_ops":
    op = _jax_pallas_ops(kind)

    def f(x, r, w, b):
      h = x + r
      # Arguments by position (num_warps, num_stages, eps, backward impl, interpret are
      # non-differentiable); the op maps over two leading axes.
      y = op(h[None], w.astype(x.dtype), b.astype(x.dtype), None, 3, eps, "triton", False)
      return y[0].astype(x.dtype), h
  else:
    def f(x, r, w, b):
      return api.fused_add_norm(x, r, w, b if kind == "layer" else None, kind=kind, eps=eps,
                                impl=impl_name)

  fwd = jax.jit(f)

  def fwd_bwd(x, r, w, b, dy, dr):
    out, vjp = jax.vjp(f, x, r, w, b)
    return out, vjp((dy, dr))

  return fwd, jax.jit(fwd_bwd)


def run(shapes, kinds, iters, copy_bytes):
  platform = jax.default_backend()
  on_accelerator = platform in ("gpu", "cuda", "rocm", "tpu")
  bw = copy_bandwidth(copy_bytes, iters)
  impls = ["xla"] + (["pallas"] if on_accelerator else [])
  if platform in ("gpu", "cuda") and _jax_pallas_ops("rms") is not None:
    impls.append("jax_pallas_ops")
  rows = []
  for kind in kinds:
    for tokens, d in shapes:
      keys = jax.random.split(jax.random.PRNGKey(0), 4)
      x = jax.random.normal(keys[0], (tokens, d), jnp.bfloat16)
      r = jax.random.normal(keys[1], (tokens, d), jnp.bfloat16)
      dy = jax.random.normal(keys[2], (tokens, d), jnp.bfloat16)
      dr = jax.random.normal(keys[3], (tokens, d), jnp.bfloat16)
      w = jnp.ones((d,), jnp.float32)
      b = jnp.zeros((d,), jnp.float32)
      elem_bytes = tokens * d * 2
      row = {"kind": kind, "tokens": tokens, "d": d, "dtype": "bfloat16"}
      for impl in ["xla", "pallas", "jax_pallas_ops"]:
        if impl not in impls:
          row[impl] = None
          continue
        fwd, fwd_bwd = _fns(kind, impl)
        t_fwd = _time(fwd, x, r, w, b, iters=iters)
        t_all = _time(fwd_bwd, x, r, w, b, dy, dr, iters=iters)
        t_bwd = max(t_all - t_fwd, 1e-9)
        row[impl] = {
            "fwd_ms": 1e3 * t_fwd, "bwd_ms": 1e3 * t_bwd, "fwd_bwd_ms": 1e3 * t_all,
            "fwd_bw_frac": 4 * elem_bytes / t_fwd / bw,
            "bwd_bw_frac": 4 * elem_bytes / t_bwd / bw,
            "fwd_bwd_bw_frac": 8 * elem_bytes / t_all / bw,
        }
      if row["pallas"] is not None:
        row["pallas_speedup_fwd_bwd"] = row["xla"]["fwd_bwd_ms"] / row["pallas"]["fwd_bwd_ms"]
      rows.append(row)
      _print_row(row)
  return {"device": jax.devices()[0].device_kind, "platform": platform,
          "jax_version": jax.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "copy_bandwidth_GBps": bw / 1e9, "iters": iters, "rows": rows}


def _cell(entry, key, fmt):
  return "n/a" if entry is None else format(entry[key], fmt)


def _print_row(row):
  parts = [f"{row['kind']:>5} {row['tokens']:>6}x{row['d']:<5}"]
  for impl in ("xla", "pallas", "jax_pallas_ops"):
    e = row[impl]
    parts.append(f"{impl}: fwd {_cell(e, 'fwd_ms', '8.3f')} ms ({_cell(e, 'fwd_bw_frac', '.2f')}) "
                 f"bwd {_cell(e, 'bwd_ms', '8.3f')} ({_cell(e, 'bwd_bw_frac', '.2f')}) "
                 f"f+b {_cell(e, 'fwd_bwd_ms', '8.3f')}")
  if "pallas_speedup_fwd_bwd" in row:
    parts.append(f"speedup {row['pallas_speedup_fwd_bwd']:.2f}x")
  print(" | ".join(parts), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
  parser.add_argument("--shapes", default=None, help="e.g. 4096x1024,65536x8192")
  parser.add_argument("--kinds", default="rms,layer")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = parser.parse_args()
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  else:
    shapes = SMALL_SHAPES if args.small else LARGE_SHAPES
  iters = args.iters or (5 if args.small else 50)
  copy_bytes = (64 if args.small else 1024) * 2**20
  print(f"device {jax.devices()[0].device_kind}; time in ms, (fraction of copy bandwidth); "
        "bwd = (fwd+bwd) - fwd", flush=True)
  result = run(shapes, args.kinds.split(","), iters, copy_bytes)
  print(f"copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s")
  write_json(result, args.out, name=f"norm_kernels_{result['platform']}_"
             f"{datetime.date.today().isoformat()}.json")


if __name__ == "__main__":
  main()
