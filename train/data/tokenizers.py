"""Tokenizers: byte-level (default, no files), SentencePiece and Hugging Face ``tokenizers``.

Every tokenizer has ``vocab_size``, ``encode(text) -> int32 array`` and ``decode(ids) -> str``.
The two file-based ones are optional dependencies, imported only when asked for.
"""

from __future__ import annotations

import os

import numpy as np

from jaxblocks.errors import ConfigError


class ByteTokenizer:
  """UTF-8 bytes as token ids ``0..255``."""

  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A local SentencePiece ``.model`` file."""

  def __init__(self, path: str):
    try:
      import sentencepiece
    except ImportError:
      raise ConfigError("data.tokenizer", "'sentencepiece' needs the sentencepiece package: "
                        "pip install 'jaxblocks[data]'") from None
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A local Hugging Face ``tokenizers`` JSON file (``tokenizer.json``)."""

  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError:
      raise ConfigError("data.tokenizer", "'huggingface' needs the tokenizers package: "
                        "pip install 'jaxblocks[data]'") from None
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def load(kind: str, path: str = ""):
  """The tokenizer named by ``data.tokenizer`` (``path`` for the file-based kinds)."""
  if kind == "byte":
    return ByteTokenizer()
  if not os.path.isfile(path):
    raise ConfigError("data.tokenizer_path", f"tokenizer file not found: {path!r}")
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  if kind == "huggingface":
    return HuggingFaceTokenizer(path)
  raise ConfigError("data.tokenizer", f"unknown tokenizer {kind!r}")
