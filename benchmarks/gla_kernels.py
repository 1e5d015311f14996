"""Benchmark: chunked gated linear attention, Pallas kernel vs XLA reference vs fla vs softmax.

For each sequence length T with ``B·T`` tokens fixed, H heads, bfloat16, per-key-dim log-gates:
forward and forward+backward time of

  * ``pallas``: :func:`jaxblocks.kernels.gla.api.chunk_gla` (``impl="pallas"``);
  * ``xla``:    the XLA chunkwise reference (``impl="xla"``);
  * ``fla``:    flash-linear-attention's Triton ``chunk_gla`` via torch in the same process (only if
                ``fla`` and a CUDA torch import);
  * ``softmax``: causal ``jax.nn.dot_product_attention`` (cuDNN on GPU; XLA elsewhere); it
                takes one head dim, so q/k are zero-padded from ``dk`` to ``dv``.

    python benchmarks/gla_kernels.py                  # GPU: B·T = 32K, H = 16, T = 1K … 32K,
                                                      #      (dk, dv) = (128, 256) and (128, 128)
    python benchmarks/gla_kernels.py --small          # CPU-sized shapes; kernel columns n/a
    python benchmarks/gla_kernels.py --small --interpret   # also time the interpreted kernel

Prints a table and writes JSON (device, date, rows) to ``benchmarks/results/``. On CPU the Pallas
column is ``n/a`` (or, with ``--interpret``, labelled as the interpreter's time, which says
nothing about kernel speed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import jax.numpy as jnp

from jaxblocks.kernels.gla import api
from measure import median_seconds, write_json

LARGE = dict(tokens=32768, heads=16, dims=[(128, 256), (128, 128)],
             lengths=[1024, 2048, 4096, 8192, 16384, 32768])
SMALL = dict(tokens=1024, heads=2, dims=[(32, 64)], lengths=[128, 256, 512])


def _time(fn, *args, iters: int) -> float:
  return median_seconds(fn, *args, iters=iters, warmup=2)


def _inputs(b, t, h, dk, dv):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  bf = jnp.bfloat16
  q = jax.random.normal(ks[0], (b, t, h, dk), bf)
  k = jax.random.normal(ks[1], (b, t, h, dk), bf)
  v = jax.random.normal(ks[2], (b, t, h, dv), bf)
  g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, dk), jnp.float32) + 3.0) / 16.0
  return q, k, v, g


def _gla_fns(impl, interpret):
  def fwd(q, k, v, g):
    return api.chunk_gla(q, k, v, g, impl=impl, interpret=interpret)[0]

  def loss(q, k, v, g):
    return jnp.sum(fwd(q, k, v, g).astype(jnp.float32))

  return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _softmax_fns(dk, dv):
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

  def fwd(q, k, v):
    if dk != dv:  # one head dim for q, k and v: pad q/k to dv (zeros change no score)
      pad = [(0, 0)] * 3 + [(0, dv - dk)]
      q, k = jnp.pad(q, pad), jnp.pad(k, pad)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl,
                                        scale=dk ** -0.5)

  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  return impl, jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _fla_times(b, t, h, dk, dv, iters):
  """(forward s, forward+backward s) of fla's Triton chunk_gla, or a reason string."""
  try:
    import torch
    from fla.ops.gla import chunk_gla as fla_chunk_gla
  except Exception as e:  # not installed
    return f"unavailable ({type(e).__name__})"
  if not torch.cuda.is_available():
    return "unavailable (no CUDA torch)"
  dev = torch.device("cuda")
  q = torch.randn(b, t, h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
  k = torch.randn(b, t, h, dk, device=dev, dtype=torch.bfloat16, requires_grad=True)
  v = torch.randn(b, t, h, dv, device=dev, dtype=torch.bfloat16, requires_grad=True)
  g = (torch.nn.functional.logsigmoid(torch.randn(b, t, h, dk, device=dev) + 3) / 16)
  g = g.requires_grad_(True)

  def run(backward):
    o, _ = fla_chunk_gla(q, k, v, g)
    if backward:
      o.float().sum().backward()

  out = []
  for backward in (False, True):
    for _ in range(2):
      run(backward)
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
      start = time.perf_counter()
      run(backward)
      torch.cuda.synchronize()
      samples.append(time.perf_counter() - start)
    out.append(statistics.median(samples))
  return tuple(out)


def _ms(x):
  return "n/a" if x is None else f"{1e3 * x:9.3f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
  parser.add_argument("--interpret", action="store_true",
                      help="on CPU, time the Pallas kernel in interpret mode (labelled)")
  parser.add_argument("--iters", type=int, default=None)
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  sizes = SMALL if args.small else LARGE
  iters = args.iters or (3 if args.small else 20)
  device = jax.devices()[0]
  on_accelerator = jax.default_backend() in ("gpu", "tpu")
  kernel_mode = "kernel" if on_accelerator else ("interpret" if args.interpret else None)
  rows = []
  header = (f"{'dk':>4} {'dv':>4} {'B':>4} {'T':>6} | {'pallas fwd':>10} {'xla fwd':>9} "
            f"{'fla fwd':>9} {'softmax fwd':>11} | {'pallas f+b':>10} {'xla f+b':>9} "
            f"{'fla f+b':>9} {'softmax f+b':>11} | {'xla/pallas f+b':>14}  (ms)")
  print(f"device: {device.device_kind} ({jax.default_backend()}); pallas column: "
        f"{kernel_mode or 'n/a (no accelerator)'}")
  print(header)
  for dk, dv in sizes["dims"]:
    for t in sizes["lengths"]:
      b = sizes["tokens"] // t
      q, k, v, g = _inputs(b, t, sizes["heads"], dk, dv)
      xf, xb = _gla_fns("xla", None)
      x_fwd, x_fb = _time(xf, q, k, v, g, iters=iters), _time(xb, q, k, v, g, iters=iters)
      p_fwd = p_fb = None
      if kernel_mode is not None:
        pf, pb = _gla_fns("pallas", None)
        p_fwd, p_fb = _time(pf, q, k, v, g, iters=iters), _time(pb, q, k, v, g, iters=iters)
      s_impl, sf, sb = _softmax_fns(dk, dv)
      s_fwd, s_fb = _time(sf, q, k, v, iters=iters), _time(sb, q, k, v, iters=iters)
      fla = _fla_times(b, t, sizes["heads"], dk, dv, iters)
      f_fwd, f_fb = (fla if isinstance(fla, tuple) else (None, None))
      speedup = None if p_fb is None else x_fb / p_fb
      print(f"{dk:>4} {dv:>4} {b:>4} {t:>6} | {_ms(p_fwd):>10} {_ms(x_fwd):>9} {_ms(f_fwd):>9} "
            f"{_ms(s_fwd):>11} | {_ms(p_fb):>10} {_ms(x_fb):>9} {_ms(f_fb):>9} {_ms(s_fb):>11} | "
            f"{'n/a' if speedup is None else f'{speedup:.2f}x':>14}")
      rows.append(dict(dk=dk, dv=dv, batch=b, seq=t, heads=sizes["heads"], dtype="bfloat16",
                       pallas_mode=kernel_mode, pallas_fwd_s=p_fwd, pallas_fwd_bwd_s=p_fb,
                       xla_fwd_s=x_fwd, xla_fwd_bwd_s=x_fb, fla_fwd_s=f_fwd, fla_fwd_bwd_s=f_fb,
                       fla_note=None if isinstance(fla, tuple) else fla,
                       softmax_impl=s_impl, softmax_fwd_s=s_fwd, softmax_fwd_bwd_s=s_fb))
  date = datetime.date.today().isoformat()
  note = ("accelerator run" if on_accelerator else
          "CPU run at tiny sizes: no GPU was available, so no GPU numbers were measured; "
          "the script is ready for H100/H200 (run without --small). "
          + ("Pallas times are the interpreter's, not a kernel's." if args.interpret else
             "Pallas columns n/a."))
  result = dict(benchmark="gla_kernels", device=device.device_kind,
                platform=jax.default_backend(), date=date, jax=jax.__version__, note=note,
                tokens=sizes["tokens"], rows=rows)
  write_json(result, os.path.join(args.out, f"gla_kernels_{jax.default_backend()}_{date}.json"),
             indent=1)


if __name__ == "__main__":
  main()
