"""Pre-LN vs converted Pre-RMSNorm vs Pre-CRMSNorm inference (prefill) time.

A GPT-2-small-shaped model (d 768, 12 heads, GELU MLP 3072, learned positions, LayerNorm with
bias, vocab 50257) is converted exactly (jaxblocks.tricks.rmsnorm_conversion) and the three
equivalent models are timed on the same prompts (batch 1 and 8, sequence 512). Times are reported
as ratios to Pre-LN measured in the same run (SPECS.md quotes 0.90–0.97 for GPT-3 Small/Medium).

On CPU the default is 2 layers and the layer stack only (the 50257-way LM head, identical in the
three models, is 2/3 of the FLOPs at that depth and would drown the norms); ``--layers 12
--with-head`` is the full model end to end.

    PYTHONPATH=. python3 benchmarks/norms.py [--layers 12] [--with-head] [--batches 1 8] [--seq 512]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxblocks import model  # noqa: E402
from jaxblocks import params as P  # noqa: E402
from jaxblocks.attention.base import AttentionConfig  # noqa: E402
from jaxblocks.config import ModelConfig  # noqa: E402
from jaxblocks.mlp import MlpConfig  # noqa: E402
from jaxblocks.norms import NormConfig  # noqa: E402
from jaxblocks.tricks import rmsnorm_conversion  # noqa: E402
from measure import median_seconds, write_json  # noqa: E402


def gpt2_small(n_layers: int, seq: int) -> ModelConfig:
  return ModelConfig(vocab_size=50257, d_model=768, n_layers=n_layers, max_seq_len=seq,
                     norm=NormConfig(kind="layernorm", bias=True, eps=1e-5),
                     attention=AttentionConfig(n_heads=12, bias=True, out_bias=True, rope=False),
                     mlp=MlpConfig(kind="gelu", d_ff=3072, bias=True),
                     position_embedding="learned", tie_embeddings=True).validate()


def random_params(cfg: ModelConfig, seed: int = 0):
  rng = np.random.default_rng(seed)
  specs = model.specs(cfg)
  def draw(path, s):
    gain = 1.0 if str(path[-1].key) == "scale" else 0.0
    return jnp.asarray(gain + 0.02 * rng.standard_normal(s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(draw, specs, is_leaf=P.is_spec)


def time_call(fn, *args, reps: int) -> float:
  return median_seconds(fn, *args, iters=reps)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--with-head", action="store_true",
                  help="time the LM head too (default: the layer stack, return_hidden=True)")
  ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/norms_<backend>.json)")
  args = ap.parse_args()

  cfg = gpt2_small(args.layers, args.seq)
  params_ln = random_params(cfg)
  params_rms, cfg_rms = rmsnorm_conversion.to_pre_rmsnorm(params_ln, cfg)
  params_crms, cfg_crms = rmsnorm_conversion.to_pre_crmsnorm(params_rms, cfg_rms)
  variants = {"pre_ln": (params_ln, cfg), "pre_rmsnorm": (params_rms, cfg_rms),
              "pre_crmsnorm": (params_crms, cfg_crms)}
  apply = jax.jit(model.apply, static_argnames=("cfg", "return_hidden"))
  fwd = lambda p, t, c: apply(p, t, c, return_hidden=not args.with_head)  # noqa: E731
  logits = lambda p, t, c: apply(p, t, c, return_hidden=False)  # noqa: E731

  rows = []
  for batch in args.batches:
    tokens = jax.random.randint(jax.random.key(batch), (batch, args.seq), 0, cfg.vocab_size)
    ref = logits(params_ln, tokens[:, :64], cfg)
    results = {}
    for name, (p, c) in variants.items():
      # The conversions are exact: check before timing (on a prefix, to keep CPU runs short).
      err = float(jnp.max(jnp.abs(logits(p, tokens[:, :64], c) - ref)))
      results[name] = {"seconds": time_call(lambda p, t, c=c: fwd(p, t, c), p, tokens,
                                            reps=args.reps), "max_abs_logit_diff": err}
    base = results["pre_ln"]["seconds"]
    for name, r in results.items():
      rows.append({"batch": batch, "seq": args.seq, "variant": name, "seconds": r["seconds"],
                   "ratio_to_pre_ln": r["seconds"] / base,
                   "max_abs_logit_diff": r["max_abs_logit_diff"]})

  print(f"{'batch':>5} {'variant':>14} {'ms':>10} {'ratio':>7} {'max|dlogit|':>12}")
  for r in rows:
    print(f"{r['batch']:>5} {r['variant']:>14} {1e3 * r['seconds']:10.1f} "
          f"{r['ratio_to_pre_ln']:7.3f} {r['max_abs_logit_diff']:12.2e}")
  device = jax.devices()[0]
  out = {"benchmark": "norms_prefill", "backend": jax.default_backend(),
         "device": getattr(device, "device_kind", str(device)), "cpu_count": os.cpu_count(),
         "machine": platform.machine(), "jax": jax.__version__,
         "model": {"shape": "gpt2-small", "n_layers": args.layers, "d_model": 768,
                   "vocab": 50257},
         "scope": "full model" if args.with_head else "layer stack (no LM head)",
         "load_average_1min": os.getloadavg()[0], "reps": args.reps, "rows": rows}
  write_json(out, args.out, name=f"norms_{jax.default_backend()}.json", indent=1)


if __name__ == "__main__":
  main()
