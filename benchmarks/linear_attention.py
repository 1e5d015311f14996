"""Chunked GLA vs softmax attention: forward and forward+backward time over sequence length.

The number of tokens per call (batch × T) is held fixed, so a linear-time operator shows a flat
time per token while softmax attention grows linearly per token (quadratically per sequence).
Prints a table, writes JSON to ``benchmarks/results/`` and a log-log PNG (needs matplotlib,
``pip install .[bench]``), and reports the flatness of GLA's time per token between 1K and 16K
tokens and the crossover length where chunked GLA becomes faster than softmax.

    PYTHONPATH=$PWD python3 benchmarks/linear_attention.py                 # CPU defaults
    PYTHONPATH=$PWD python3 benchmarks/linear_attention.py --tokens 65536 --heads 8 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time

import jax
import jax.numpy as jnp

from jaxblocks.attention import linear_ops


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokens", type=int, default=16384, help="batch × T, fixed for every length")
  p.add_argument("--lengths", default="128,256,512,1024,2048,4096,8192,16384",
                 help="comma-separated sequence lengths (each must divide --tokens)")
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=32, help="key/query/value width per head")
  p.add_argument("--chunk-size", type=int, default=64)
  p.add_argument("--sub-chunk", type=int, default=16)
  p.add_argument("--softmax-max-len", type=int, default=8192,
                 help="skip softmax above this length (its [T, T] logits need memory)")
  p.add_argument("--min-time", type=float, default=3.0,
                 help="keep timing a point until this many seconds are spent (minimum is kept; "
                 "many samples filter out load from other processes)")
  p.add_argument("--max-repeats", type=int, default=25, help="at most this many timed runs")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/"
                 "linear_attention_<backend>.json); the PNG goes next to it")
  return p.parse_args()


def time_fn(fn, args, min_time, max_repeats):
  """Compile, then the minimum wall time (seconds) over timed calls, repeated until ``min_time``
  seconds are spent or ``max_repeats`` calls are made (at least one)."""
  jax.block_until_ready(fn(*args))
  best, spent, n = math.inf, 0.0, 0
  while n < max(1, max_repeats) and (n == 0 or spent < min_time):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    elapsed = time.perf_counter() - t0
    best, spent, n = min(best, elapsed), spent + elapsed, n + 1
  return best


def make_fns(chunk_size, sub_chunk):
  def gla_fwd(q, k, v, log_g):
    return linear_ops.chunk_gla(q, k, v, log_g, chunk_size=chunk_size, sub_chunk=sub_chunk)[0]

  def softmax_fwd(q, k, v, log_g):
    del log_g
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

  def with_grad(fwd):
    def loss(q, k, v, log_g):
      return jnp.sum(fwd(q, k, v, log_g).astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2, 3))

  return {
      ("gla", "fwd"): jax.jit(gla_fwd),
      ("gla", "fwd+bwd"): jax.jit(with_grad(gla_fwd)),
      ("softmax", "fwd"): jax.jit(softmax_fwd),
      ("softmax", "fwd+bwd"): jax.jit(with_grad(softmax_fwd)),
  }


def crossover(rows, mode):
  """First length where softmax is slower than GLA, and the log-log interpolated crossing."""
  pts = [(r["T"], r["softmax"][mode], r["gla"][mode]) for r in rows
         if r["softmax"][mode] is not None]
  prev = None
  for t, s, g in pts:
    ratio = math.log(s / g)
    if ratio > 0:
      if prev is None:
        return {"first_measured": t, "interpolated": None, "note": "softmax already slower at "
                "the shortest length"}
      t0, r0 = prev
      frac = -r0 / (ratio - r0)
      est = math.exp(math.log(t0) + frac * (math.log(t) - math.log(t0)))
      return {"first_measured": t, "interpolated": round(est)}
    prev = (t, ratio)
  return {"first_measured": None, "interpolated": None, "note": "softmax faster at every length"}


def plot(rows, path, title):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed (pip install .[bench]); skipping the plot")
    return None
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for kind, color in (("gla", "tab:blue"), ("softmax", "tab:red")):
    for mode, style in (("fwd", "-o"), ("fwd+bwd", "--s")):
      pts = [(r["T"], r[kind][mode] / r["tokens"] * 1e9) for r in rows if r[kind][mode] is not None]
      if pts:
        ax.plot(*zip(*pts), style, color=color, label=f"{'chunked GLA' if kind == 'gla' else kind} {mode}")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("sequence length T (batch × T fixed)")
  ax.set_ylabel("time per token (ns)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return path


def main():
  args = parse_args()
  lengths = [int(x) for x in args.lengths.split(",")]
  for t in lengths:
    if args.tokens % t:
      raise SystemExit(f"--lengths: {t} does not divide --tokens={args.tokens}")
  dtype = jnp.dtype(args.dtype)
  h, d = args.heads, args.head_dim
  fns = make_fns(args.chunk_size, args.sub_chunk)
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  rows = []
  print(f"backend={backend} device={device} tokens={args.tokens} heads={h} head_dim={d} "
        f"chunk={args.chunk_size}/{args.sub_chunk} dtype={args.dtype}")
  header = f"{'T':>6} {'batch':>5} | {'GLA fwd':>9} {'GLA f+b':>9} | {'SM fwd':>9} {'SM f+b':>9} | ns/token GLA fwd, f+b"
  print(header)
  print("-" * len(header))
  for t in lengths:
    b = args.tokens // t
    ks = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, t, h, d), dtype)
    v = jax.random.normal(ks[2], (b, t, h, d), dtype)
    log_g = (jax.nn.log_sigmoid(jax.random.normal(ks[3], (b, t, h, d))) / 16).astype(dtype)
    row = {"T": t, "batch": b, "tokens": b * t, "gla": {}, "softmax": {}}
    for (kind, mode), fn in fns.items():
      if kind == "softmax" and t > args.softmax_max_len:
        row[kind][mode] = None
        continue
      row[kind][mode] = time_fn(fn, (q, k, v, log_g), args.min_time, args.max_repeats)
    rows.append(row)
    fmt = lambda s: "     skip" if s is None else f"{s * 1e3:8.1f}ms"
    print(f"{t:>6} {b:>5} | {fmt(row['gla']['fwd'])} {fmt(row['gla']['fwd+bwd'])} | "
          f"{fmt(row['softmax']['fwd'])} {fmt(row['softmax']['fwd+bwd'])} | "
          f"{row['gla']['fwd'] / (b * t) * 1e9:.0f}, {row['gla']['fwd+bwd'] / (b * t) * 1e9:.0f}")

  summary = {}
  flat_range = [r for r in rows if 1024 <= r["T"] <= 16384]
  for mode in ("fwd", "fwd+bwd"):
    per_token = [r["gla"][mode] / r["tokens"] for r in flat_range]
    summary[mode] = {
        "gla_per_token_max_over_min_1k_16k": (max(per_token) / min(per_token)) if per_token else None,
        "crossover": crossover(rows, mode),
    }
  for mode, s in summary.items():
    ratio = s["gla_per_token_max_over_min_1k_16k"]
    verdict = "" if ratio is None else ("(flat within 1.5x)" if ratio <= 1.5 else "(NOT flat within 1.5x)")
    c = s["crossover"]
    print(f"{mode}: GLA time/token max/min over 1K-16K = {ratio:.2f} {verdict}; softmax slower "
          f"than chunked GLA from T = {c['first_measured']} (interpolated crossing "
          f"{c['interpolated']})")

  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"linear_attention_{backend}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  result = {
      "benchmark": "linear_attention", "backend": backend, "device": device,
      "host": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
      "jax_version": jax.__version__, "config": vars(args), "rows": rows, "summary": summary,
      "units": "seconds per call (minimum over repeated calls)",
      "load_average_1m_at_end": os.getloadavg()[0],
  }
  png = plot(rows, os.path.splitext(out)[0] + ".png",
             f"chunked GLA vs softmax, {device}, batch×T={args.tokens}, H={h}, d={d}")
  result["plot"] = None if png is None else os.path.basename(png)
  with open(out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {out}" + ("" if png is None else f" and {png}"))


if __name__ == "__main__":
  main()
