"""The grain input pipeline.

Per data shard::

    MapDataset.source(train documents) → shuffle(seed) → repeat (new order every epoch)
      → this shard's slice → tokenize → drop empty → IterDataset
      → concat-then-split packing into rows of seq_len + 1 tokens (segment ids per document)
      → batch(rows per shard)

A process builds the shards it owns (``shard % process_count == process_index``), each
prefetched in a background thread, and concatenates their rows. Everything is deterministic
given ``data.shuffle_seed``; ``iterator.get_state()`` / ``set_state()`` keep one state per shard
(checkpointed through Orbax, one file per shard), so a run resumes at exactly the next batch,
also with another process count. Sharding happens at the document level, so each process
reads and tokenizes only its own documents.

A batch is a dict of int32 arrays ``[rows, seq_len + 1]``: ``tokens``, ``segment_ids`` (1, 2, ...
per packed document, 0 for padding) and ``positions`` (restarting at 0 at every document and
row start). The train step predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import grain.experimental as grain_exp
import numpy as np

from jaxblocks.errors import ConfigError

from train.data import sources
from train.data.config import DataConfig

_SPLIT_SEED = 0x5EED  # The train/eval split never changes with data.shuffle_seed.


@dataclasses.dataclass(frozen=True)
class Layout:
  """How the global batch is divided between data shards and processes."""

  num_shards: int
  own_shards: tuple[int, ...]
  rows_per_shard: int

  @property
  def local_rows(self) -> int:
    return self.rows_per_shard * len(self.own_shards)


def layout(cfg: DataConfig, process_index: int, process_count: int) -> Layout:
  """Data shards of this process; errors name the config key when the split is impossible."""
  n = cfg.num_shards or process_count
  if n % process_count:
    raise ConfigError("data.num_shards", f"{n} shards cannot be divided between "
                      f"{process_count} processes")
  if cfg.global_batch_size % n:
    raise ConfigError("data.global_batch_size", f"{cfg.global_batch_size} is not divisible by "
                      f"the {n} data shards")
  own = tuple(s for s in range(n) if s % process_count == process_index)
  return Layout(n, own, cfg.global_batch_size // n)


def split(docs: Sequence[str], eval_fraction: float) -> tuple[Sequence[str], Sequence[str]]:
  """Held-out split: a fixed permutation sends ``eval_fraction`` of the documents to eval."""
  n = len(docs)
  n_eval = 0 if eval_fraction == 0 else max(1, int(round(eval_fraction * n)))
  if n_eval >= n:
    raise ConfigError("data.eval_fraction", f"leaves no training documents ({n} documents, "
                      f"{n_eval} held out)")
  perm = np.random.default_rng(_SPLIT_SEED).permutation(n)
  eval_idx = np.sort(perm[:n_eval])
  train_idx = np.sort(perm[n_eval:])
  return sources.Subset(docs, train_idx), sources.Subset(docs, eval_idx)


def _with_positions(row: dict) -> dict:
  seg = row["segment_ids"]
  t = seg.shape[-1]
  idx = np.arange(t, dtype=np.int32)
  start = np.concatenate([np.ones_like(seg[..., :1], dtype=bool), seg[..., 1:] != seg[..., :-1]],
                         axis=-1)
  last_start = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
  return {"tokens": row["tokens"].astype(np.int32), "segment_ids": seg.astype(np.int32),
          "positions": (idx - last_start).astype(np.int32)}


def _packed(ds: grain.MapDataset, tokenizer, seq_len: int) -> grain.IterDataset:
  ds = ds.map(lambda doc: {"tokens": tokenizer.encode(doc)})
  ds = ds.filter(lambda ex: ex["tokens"].size > 0)
  packed = grain_exp.ConcatThenSplitIterDataset(ds.to_iter_dataset(),
                                                length_struct={"tokens": seq_len + 1})
  return packed.map(lambda ex: {"tokens": ex["tokens"], "segment_ids": ex["tokens_segment_ids"]})


def _concat_rows(*batches: dict) -> dict:
  return {k: np.concatenate([b[k] for b in batches], axis=0) for k in batches[0]}


class ShardedIterator:
  """The batches of this process: one grain iterator per owned data shard, their rows
  concatenated. ``get_state()`` is ``{shard id: that shard's grain state}``, so a checkpoint can
  be resumed by any process count that divides ``num_shards`` (each process restores the shards
  it owns now, whoever wrote them)."""

  def __init__(self, shard_datasets: dict[int, grain.IterDataset], num_shards: int):
    self.num_shards = num_shards
    self._iters = {shard: iter(ds) for shard, ds in shard_datasets.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [next(it) for it in self._iters.values()]
    return _with_positions(rows[0] if len(rows) == 1 else _concat_rows(*rows))

  def get_state(self) -> dict[str, dict]:
    return {str(shard): it.get_state() for shard, it in self._iters.items()}

  def set_state(self, state: dict[str, dict]) -> None:
    missing = sorted(set(map(str, self._iters)) - set(state))
    if missing:
      raise ValueError(f"data iterator state has no entry for shards {missing}")
    for shard, it in self._iters.items():
      it.set_state(state[str(shard)])

  def close(self) -> None:
    for it in self._iters.values():
      if hasattr(it, "close"):
        it.close()


@dataclasses.dataclass(frozen=True)
class ShardedDataset:
  """Iterable over :class:`ShardedIterator` s (each ``iter()`` starts from the beginning)."""

  shards: dict[int, grain.IterDataset]
  num_shards: int

  def __iter__(self) -> ShardedIterator:
    return ShardedIterator(self.shards, self.num_shards)


def train_dataset(cfg: DataConfig, tokenizer, docs: Sequence[str], lay: Layout) -> ShardedDataset:
  """The endless, shuffled, packed and batched training stream of this process."""
  base = grain.MapDataset.source(docs).shuffle(seed=cfg.shuffle_seed).repeat(None)
  shards = {}
  for shard in lay.own_shards:
    ds = _packed(base[shard::lay.num_shards], tokenizer, cfg.seq_len)
    ds = ds.batch(lay.rows_per_shard, drop_remainder=True)
    if cfg.prefetch:
      ds = grain_exp.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    shards[shard] = ds
  return ShardedDataset(shards, lay.num_shards)


def eval_batches(cfg: DataConfig, tokenizer, docs: Sequence[str], lay: Layout,
                 max_batches: int) -> list[dict]:
  """Fixed held-out batches of this process (one pass over its eval shards, no shuffling)."""
  if len(docs) == 0 or max_batches == 0:
    return []
  base = grain.MapDataset.source(docs)
  per_shard = []
  for shard in lay.own_shards:
    ds = _packed(base[shard::lay.num_shards], tokenizer, cfg.seq_len)
    ds = ds.batch(lay.rows_per_shard, drop_remainder=True)
    out = []
    for batch in ds:
      out.append(batch)
      if len(out) == max_batches:
        break
    per_shard.append(out)
  n = min(len(b) for b in per_shard)
  return [_with_positions(_concat_rows(*(s[i] for s in per_shard))) for i in range(n)]
