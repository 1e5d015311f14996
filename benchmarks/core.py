"""Core model benchmarks: compile time vs depth (scan vs unrolled) and CPU training throughput.

    python benchmarks/core.py            # prints a table, writes benchmarks/results/core_<device>_<date>.json

1. Compile time of the forward+backward step of a 2-layer and a 48-layer model, scanned and
   unrolled. Under ``lax.scan`` the compiled program holds one layer body, so compile time stays
   nearly flat in depth; unrolled it grows with depth.
2. Forward+backward throughput (tokens/s) of the tiny default model, the baseline later changes are
   compared against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

import jaxblocks as jb
from jaxblocks import model


def _loss(params, tokens, cfg):
  logits = model.apply(params, tokens[:, :-1], cfg)
  tgt = tokens[:, 1:]
  return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0])


def compile_seconds(cfg, batch, seq):
  params = jb.params.abstract(model.specs(cfg))
  toks = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  step = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
  t0 = time.perf_counter()
  step.lower(params, toks, cfg).compile()
  return time.perf_counter() - t0


def throughput(cfg, batch, seq, steps):
  params = model.init(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size, jnp.int32)
  step = jax.jit(jax.value_and_grad(_loss), static_argnums=2)
  jax.block_until_ready(step(params, toks, cfg))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = step(params, toks, cfg)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t0) / steps
  return batch * seq / dt, dt


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d-model", type=int, default=128)
  ap.add_argument("--deep", type=int, default=48)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args(argv)

  base = jb.ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=2, max_seq_len=256,
                        attention=jb.AttentionConfig(n_heads=4))
  rows = []
  for scan in (True, False):
    for depth in (2, args.deep):
      cfg = base.replace(n_layers=depth, scan_layers=scan)
      rows.append({"scan_layers": scan, "n_layers": depth,
                   "compile_s": round(compile_seconds(cfg, 4, 64), 3)})
  ratios = {}
  for scan in (True, False):
    small = next(r for r in rows if r["scan_layers"] == scan and r["n_layers"] == 2)["compile_s"]
    deep = next(r for r in rows if r["scan_layers"] == scan and r["n_layers"] == args.deep)["compile_s"]
    ratios["scanned" if scan else "unrolled"] = round(deep / small, 2)

  tiny = base.replace(n_layers=4)
  tps, dt = throughput(tiny, 8, 128, args.steps)
  result = {
      "benchmark": "core",
      "device": jax.devices()[0].device_kind,
      "backend": jax.default_backend(),
      "host": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "jax": jax.__version__,
      "date": datetime.date.today().isoformat(),
      "compile": rows,
      "compile_ratio_deep_over_shallow": ratios,
      "train_step": {"config": "d_model=%d n_layers=4 batch=8 seq=128" % args.d_model,
                     "tokens_per_s": round(tps, 1), "step_ms": round(dt * 1e3, 2)},
  }
  print(f"{'scan':>6} {'layers':>6} {'compile s':>10}")
  for r in rows:
    print(f"{str(r['scan_layers']):>6} {r['n_layers']:>6} {r['compile_s']:>10.2f}")
  print(f"compile ratio {args.deep}L/2L: scanned {ratios['scanned']}x, unrolled {ratios['unrolled']}x")
  print(f"fwd+bwd throughput ({result['train_step']['config']}): {tps:,.0f} tokens/s "
        f"({dt * 1e3:.1f} ms/step)")
  os.makedirs(args.out, exist_ok=True)
  dev = result["device"].replace(" ", "_").lower()
  path = os.path.join(args.out, f"core_{dev}_{result['date']}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print("wrote", path)


if __name__ == "__main__":
  main()
