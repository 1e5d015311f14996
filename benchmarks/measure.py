"""Measurement pieces the benchmark scripts share: wall-clock timing of compiled calls, XLA's
cost analysis, and writing a result JSON under ``benchmarks/results/``."""

from __future__ import annotations

import json
import os
import statistics
import time

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_seconds(fn, *args, iters: int, warmup: int = 1) -> float:
  """Median wall seconds per call of ``fn(*args)`` over ``iters`` calls, after compiling and
  ``warmup`` untimed calls; every call is waited for (``jax.block_until_ready``)."""
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def bytes_accessed(jitted, *args) -> float | None:
  """The bytes XLA's cost analysis reports for one call of a ``jax.jit`` function (None when the
  backend gives no analysis)."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  return None if not cost else float(cost.get("bytes accessed", float("nan")))


def write_json(result: dict, path: str | None = None, name: str | None = None,
               indent: int = 2) -> str:
  """Write ``result`` to ``path`` (default: ``benchmarks/results/<name>``); returns the path."""
  path = path or os.path.join(RESULTS, name)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=indent)
  print(f"wrote {path}")
  return path
