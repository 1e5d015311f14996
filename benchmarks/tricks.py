"""Benchmark: transformer tricks.

1. Precomputed first layer (parallel blocks, RoPE): prefill and single-token decode time at
   batch 1, original vs converted model, for a shallow and a deeper model, plus the bytes XLA
   reports as accessed by one compiled decode step and the parameter bytes. Ratios come from the
   same run. The saving is bounded by ``1/n_layers`` of the per-token weight reads.
2. SAS-P vs Pre-LN at equal width and depth: parameter count, training throughput (tokens/s after
   compilation) and mean loss over the last steps of a fixed number of AdamW steps, on the
   embedded Shakespeare corpus (the trainer's default data) as bytes, with a minimal optax loop.

    python benchmarks/tricks.py            # CPU-sized run (< 3 minutes)

Prints tables and writes JSON (device, date, rows) to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxblocks as jb
from jaxblocks import model
from jaxblocks.tricks import precompute_first_layer as pfl
from train.data import sources
from measure import bytes_accessed, median_seconds, write_json


def _time(fn, *args, iters: int) -> float:
  return median_seconds(fn, *args, iters=iters)


_bytes_accessed = bytes_accessed


def _nbytes(tree) -> int:
  return int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def _weight_bytes_read_per_token(params, vocab: int) -> int:
  """Parameter bytes one batch-1 decode step must read: every weight once, except the
  vocabulary-indexed tables under ``embed`` of which only the token's row is read (a tied head
  still reads the whole embedding, which is then counted as a weight)."""
  total = _nbytes({k: v for k, v in params.items() if k != "embed"})
  return total + _nbytes(params["embed"]) // vocab


# ----------------------------------------------------------------------------- precompute


def precompute_rows(n_layers_list, d_model, vocab, prompt, iters):
  rows = []
  for n_layers in n_layers_list:
    cfg = jb.ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers,
                         max_seq_len=prompt + 8, tie_embeddings=False,
                         attention=jb.AttentionConfig(n_heads=d_model // 64),
                         block=jb.BlockConfig(topology="parallel"),
                         mlp=jb.MlpConfig(kind="gelu")).validate()
    params = model.init(cfg, jax.random.key(0))
    new, new_cfg = pfl.convert(params, cfg)
    tokens = jax.random.randint(jax.random.key(1), (1, prompt), 0, vocab, jnp.int32)
    row = {"n_layers": n_layers, "d_model": d_model, "vocab": vocab, "prompt": prompt}
    for name, p, c in (("original", params, cfg), ("precomputed", new, new_cfg)):
      prefill = jax.jit(lambda p, t, c=c: model.apply(p, t, c))
      cache = model.init_cache(c, 1, prompt + 8)
      _, cache = jax.jit(model.apply_cached, static_argnums=2)(p, tokens, c, cache)
      step = jax.jit(lambda p, t, k, c=c: model.apply_cached(p, t, c, k)[0])
      tok = tokens[:, -1:]
      row[f"{name}_prefill_ms"] = 1e3 * _time(prefill, p, tokens, iters=iters)
      row[f"{name}_decode_ms"] = 1e3 * _time(step, p, tok, cache, iters=iters)
      row[f"{name}_decode_bytes_accessed"] = _bytes_accessed(step, p, tok, cache)
      row[f"{name}_param_bytes"] = _nbytes(p)
      row[f"{name}_weight_bytes_read_per_token"] = _weight_bytes_read_per_token(p, vocab)
    for key in ("prefill_ms", "decode_ms", "decode_bytes_accessed", "param_bytes",
                "weight_bytes_read_per_token"):
      row[f"ratio_{key}"] = row[f"precomputed_{key}"] / row[f"original_{key}"]
    row["bound_1_minus_1_over_n_layers"] = 1 - 1 / n_layers
    row["memory_tradeoff"] = pfl.memory_tradeoff(cfg, params, new)
    rows.append(row)
  return rows


# ----------------------------------------------------------------------------- SAS-P vs Pre-LN


def corpus_bytes(n_bytes: int) -> np.ndarray:
  """The first ``n_bytes`` bytes of the embedded Shakespeare corpus (the trainer's default data),
  as byte-token ids."""
  raw = np.frombuffer(sources.embedded_text().encode("utf-8"), np.uint8).astype(np.int32)
  if raw.size < n_bytes:
    raise ValueError(f"the embedded corpus has {raw.size} bytes, {n_bytes} needed")
  return raw[:n_bytes]


def train_rows(d_model, n_layers, seq, batch, steps, lr):
  data = corpus_bytes(batch * (seq + 1) * (steps + 1))
  common = dict(vocab_size=256, d_model=d_model, n_layers=n_layers, max_seq_len=seq,
                mlp=jb.MlpConfig(kind="gelu"), attention=jb.AttentionConfig(n_heads=d_model // 32))
  configs = {
      "pre_ln": jb.ModelConfig(**common),
      "sas_p": jb.ModelConfig(**common, attention_pattern=("shaped",),
                              block=jb.BlockConfig(topology="sas_p")),
  }
  opt = optax.adamw(lr, b2=0.95, weight_decay=0.0)
  rows = []
  for name, cfg in configs.items():
    cfg.validate()
    params = model.init(cfg, jax.random.key(0))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch_tokens, cfg=cfg):
      def loss_fn(p):
        logits = model.apply(p, batch_tokens[:, :-1], cfg, training=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                               batch_tokens[:, 1:]).mean()
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    def batch_at(i):
      chunk = data[i * batch * (seq + 1):(i + 1) * batch * (seq + 1)]
      return jnp.asarray(chunk.reshape(batch, seq + 1))

    params, state, loss = step(params, state, batch_at(0))  # compile
    jax.block_until_ready(loss)
    losses = []
    start = time.perf_counter()
    for i in range(1, steps + 1):
      params, state, loss = step(params, state, batch_at(i))
      losses.append(loss)
    losses = [float(x) for x in jax.block_until_ready(losses)]
    elapsed = time.perf_counter() - start
    rows.append({"model": name, "params": model.count_params(cfg),
                 "tokens_per_s": steps * batch * seq / elapsed,
                 "loss_first": losses[0], "loss_final_mean10": float(np.mean(losses[-10:])),
                 "steps": steps, "batch": batch, "seq": seq, "d_model": d_model,
                 "n_layers": n_layers, "lr": lr})
  base = rows[0]
  for r in rows:
    r["params_ratio_vs_pre_ln"] = r["params"] / base["params"]
    r["throughput_ratio_vs_pre_ln"] = r["tokens_per_s"] / base["tokens_per_s"]
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=120)
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = ap.parse_args()

  pre = precompute_rows([2, 8], d_model=256, vocab=2048, prompt=64, iters=20)
  print("precomputed first layer (parallel blocks, batch 1): converted / original")
  print(f"{'layers':>6} {'prefill':>8} {'decode':>8} {'w-read':>7} {'xla-bytes':>9} "
        f"{'params':>7} {'1-1/L':>6}")
  for r in pre:
    print(f"{r['n_layers']:>6} {r['ratio_prefill_ms']:>8.3f} {r['ratio_decode_ms']:>8.3f} "
          f"{r['ratio_weight_bytes_read_per_token']:>7.3f} "
          f"{r['ratio_decode_bytes_accessed']:>9.3f} {r['ratio_param_bytes']:>7.3f} "
          f"{r['bound_1_minus_1_over_n_layers']:>6.3f}")

  train = train_rows(d_model=128, n_layers=4, seq=64, batch=8, steps=args.steps, lr=3e-3)
  print("\nSAS-P vs Pre-LN (embedded Shakespeare corpus, byte tokens)")
  print(f"{'model':>7} {'params':>8} {'tok/s':>9} {'loss@end':>9}")
  for r in train:
    print(f"{r['model']:>7} {r['params']:>8} {r['tokens_per_s']:>9.0f} "
          f"{r['loss_final_mean10']:>9.4f}")

  os.makedirs(args.out, exist_ok=True)
  device = jax.devices()[0]
  date = datetime.date.today().isoformat()
  result = {"benchmark": "tricks", "device": f"{device.platform}:{device.device_kind}",
            "date": date, "precompute_first_layer": pre, "sas_p_vs_pre_ln": train,
            "note": "CPU run on a shared machine; SAS-P/Pre-LN trained on the embedded "
                    "Shakespeare corpus (byte tokens)."}
  write_json(result, os.path.join(args.out, f"tricks_{device.platform}_{date}.json"))


if __name__ == "__main__":
  main()
