"""Attention families. Importing this package registers every kind in ``ATTENTION``."""

from jaxblocks.attention.base import ATTENTION, AttentionConfig, AttentionKind, get, register
from jaxblocks.attention import softmax
from jaxblocks.attention import shaped, slim

__all__ = ["ATTENTION", "AttentionConfig", "AttentionKind", "get", "register", "shaped", "slim",
           "softmax"]
