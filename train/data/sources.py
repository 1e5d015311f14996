"""Documents from the embedded corpus or local files (text, JSONL, Parquet, ArrayRecord).

A *source* is a random-access sequence of document strings (``len`` and ``[i]``), which is what
``grain.MapDataset.source`` consumes. Text, JSONL and Parquet files are read into memory once;
ArrayRecord files are read lazily, record by record (each record is one UTF-8 document).
"""

from __future__ import annotations

import glob
import gzip
import importlib.resources
import json
import os
import re
from typing import Sequence

from jaxblocks.errors import ConfigError

from train.data.config import DataConfig

SUFFIX_FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl",
                  ".json": "jsonl", ".parquet": "parquet", ".array_record": "arrayrecord",
                  ".arrayrecord": "arrayrecord"}
EMBEDDED_CORPUS = "shakespeare.txt.gz"


def embedded_text() -> str:
  """The embedded public-domain corpus (see ``train/data/NOTICE``)."""
  data = importlib.resources.files("train.data").joinpath(EMBEDDED_CORPUS).read_bytes()
  return gzip.decompress(data).decode("utf-8")


def split_text(text: str, how: str) -> list[str]:
  """Cut a text into documents: the whole ``file``, ``paragraph``s or ``line``s."""
  if how == "file":
    parts = [text]
  elif how == "paragraph":
    parts = re.split(r"\n[ \t\f]*\n", text)
  else:
    parts = text.split("\n")
  return [p.strip("\n\f") + "\n" for p in parts if p.strip()]


def resolve_files(path: str) -> list[str]:
  """Files named by a path, directory or glob, sorted; clear error when none exist."""
  if os.path.isdir(path):
    files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names
             if os.path.splitext(f)[1].lower() in SUFFIX_FORMATS]
  elif any(c in path for c in "*?["):
    files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
  elif os.path.isfile(path):
    files = [path]
  else:
    raise ConfigError("data.path", f"no such file or directory: {path!r}")
  if not files:
    raise ConfigError("data.path", f"{path!r} matches no data files (known suffixes: "
                      f"{sorted(SUFFIX_FORMATS)})")
  return sorted(files)


def _format_of(file: str, fmt: str) -> str:
  if fmt != "auto":
    return fmt
  suffix = os.path.splitext(file)[1].lower()
  if suffix not in SUFFIX_FORMATS:
    raise ConfigError("data.format", f"cannot infer the format of {file!r}; set data.format to "
                      "one of text, jsonl, parquet, arrayrecord")
  return SUFFIX_FORMATS[suffix]


def _read_jsonl(file: str, field: str) -> list[str]:
  docs = []
  with open(file, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{lineno}: invalid JSON ({e.msg})") from None
      if not isinstance(row, dict) or field not in row:
        raise ConfigError("data.text_field", f"{file}:{lineno}: row has no field {field!r}")
      docs.append(str(row[field]))
  return docs


def _read_parquet(file: str, field: str) -> list[str]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ConfigError("data.format", "Parquet input needs pyarrow: "
                      "pip install 'jaxblocks[data]'") from None
  table = pq.read_table(file)
  if field not in table.column_names:
    raise ConfigError("data.text_field", f"{file}: no column {field!r}; columns are "
                      f"{table.column_names}")
  return [str(x) for x in table.column(field).to_pylist() if x is not None]


class ArrayRecordDocuments:
  """Lazy documents from ArrayRecord files: one UTF-8 text per record."""

  def __init__(self, files: Sequence[str]):
    import grain
    self._source = grain.sources.ArrayRecordDataSource(list(files))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> str:
    record = self._source[i]
    return record.decode("utf-8") if isinstance(record, bytes) else str(record)


class ConcatenatedDocuments:
  """Several random-access sources seen as one."""

  def __init__(self, parts: Sequence[Sequence[str]]):
    self._parts = [p for p in parts if len(p)]
    self._starts = []
    total = 0
    for p in self._parts:
      self._starts.append(total)
      total += len(p)
    self._len = total

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> str:
    import bisect
    j = bisect.bisect_right(self._starts, i) - 1
    return self._parts[j][i - self._starts[j]]


def documents(cfg: DataConfig) -> Sequence[str]:
  """All documents named by the data config; raises a clear error for an empty corpus."""
  if not cfg.path:
    docs: Sequence[str] = split_text(embedded_text(), cfg.text_split)
  else:
    parts = []
    for file in resolve_files(cfg.path):
      fmt = _format_of(file, cfg.format)
      if fmt == "text":
        with open(file, encoding="utf-8") as f:
          parts.append(split_text(f.read(), cfg.text_split))
      elif fmt == "jsonl":
        parts.append([d for d in _read_jsonl(file, cfg.text_field) if d])
      elif fmt == "parquet":
        parts.append([d for d in _read_parquet(file, cfg.text_field) if d])
      else:
        parts.append(ArrayRecordDocuments([file]))
    docs = parts[0] if len(parts) == 1 else ConcatenatedDocuments(parts)
  if len(docs) == 0:
    raise ConfigError("data.path", f"the corpus {cfg.path or '(embedded)'!r} holds no documents")
  return docs


class Subset:
  """The documents at ``indices`` of a random-access source."""

  def __init__(self, source: Sequence[str], indices):
    self._source, self._indices = source, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> str:
    return self._source[int(self._indices[i])]
