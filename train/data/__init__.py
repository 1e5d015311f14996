"""Training data: the embedded corpus, local file readers, tokenizers and the grain pipeline."""

from train.data.config import DataConfig

__all__ = ["DataConfig"]
