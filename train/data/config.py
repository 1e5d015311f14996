"""``DataConfig``: where the text comes from, how it is tokenised and packed."""

from __future__ import annotations

import dataclasses

from jaxblocks.errors import ConfigError, check_choice, check_int

FORMATS = ("auto", "text", "jsonl", "parquet", "arrayrecord")
TOKENIZERS = ("byte", "sentencepiece", "huggingface")
TEXT_SPLITS = ("file", "paragraph", "line")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data.

  path: a file, a directory (every file in it with a known suffix), or a glob; empty means the
    embedded Shakespeare corpus shipped with the package.
  format: ``auto`` picks by suffix (.txt/.md → text, .jsonl/.json → jsonl, .parquet,
    .array_record/.arrayrecord); or force one of ``text|jsonl|parquet|arrayrecord``.
  text_field: the field holding the text in JSONL / Parquet rows.
  text_split: how a plain-text file is cut into documents: the whole ``file``, each
    blank-line separated ``paragraph``, or each ``line``.
  tokenizer: ``byte`` (UTF-8 bytes, 256 ids, no files), ``sentencepiece`` or ``huggingface``
    (``tokenizer_path`` points at a ``.model`` or ``tokenizer.json`` file).
  seq_len: tokens per training sequence (documents are packed, with segment ids).
  global_batch_size: sequences per optimizer step over all processes.
  shuffle_seed: seed of the per-epoch document shuffle.
  eval_fraction: share of documents held out for evaluation (chosen by a fixed permutation).
  num_shards: number of data shards (0 = one per process). Each process reads only its own
    shards; fixing it makes the global batches independent of the process count.
  prefetch: batches prepared ahead in a background thread (0 disables).
  """

  path: str = ""
  format: str = "auto"
  text_field: str = "text"
  text_split: str = "paragraph"
  tokenizer: str = "byte"
  tokenizer_path: str = ""
  seq_len: int = 128
  global_batch_size: int = 16
  shuffle_seed: int = 0
  eval_fraction: float = 0.02
  num_shards: int = 0
  prefetch: int = 2

  def validate(self, prefix: str = "data") -> "DataConfig":
    check_choice(f"{prefix}.format", self.format, FORMATS)
    check_choice(f"{prefix}.tokenizer", self.tokenizer, TOKENIZERS)
    check_choice(f"{prefix}.text_split", self.text_split, TEXT_SPLITS)
    check_int(f"{prefix}.seq_len", self.seq_len, minimum=2)
    check_int(f"{prefix}.global_batch_size", self.global_batch_size, minimum=1)
    check_int(f"{prefix}.shuffle_seed", self.shuffle_seed, minimum=0)
    check_int(f"{prefix}.num_shards", self.num_shards, minimum=0)
    check_int(f"{prefix}.prefetch", self.prefetch, minimum=0)
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ConfigError(f"{prefix}.eval_fraction", f"must be in [0, 1), got {self.eval_fraction}")
    if self.tokenizer != "byte" and not self.tokenizer_path:
      raise ConfigError(f"{prefix}.tokenizer_path",
                        f"tokenizer '{self.tokenizer}' needs the path of its model file")
    if self.tokenizer == "byte" and self.tokenizer_path:
      raise ConfigError(f"{prefix}.tokenizer_path",
                        "the byte tokenizer takes no file; set data.tokenizer to "
                        "'sentencepiece' or 'huggingface'")
    if self.num_shards and self.global_batch_size % self.num_shards:
      raise ConfigError(f"{prefix}.global_batch_size",
                        f"{self.global_batch_size} is not divisible by data.num_shards="
                        f"{self.num_shards}")
    return self
