"""Attention families. Importing this package registers every kind in ``ATTENTION``:
``softmax`` (softmax.py), ``gla`` (gla.py), ``linear``, ``retention``, ``sla`` (linear.py),
``shaped`` (shaped.py) and ``slim`` (slim.py); the linear-attention operators they share are in
linear_ops.py."""

from jaxblocks.attention.base import ATTENTION, AttentionConfig, AttentionKind, get, register
from jaxblocks.attention.linear_config import GLAConfig, LinearConfig, RetentionConfig, SLAConfig
from jaxblocks.attention import softmax
from jaxblocks.attention import gla, linear, linear_ops
from jaxblocks.attention import shaped, slim

__all__ = ["ATTENTION", "AttentionConfig", "AttentionKind", "GLAConfig", "LinearConfig",
           "RetentionConfig", "SLAConfig", "get", "gla", "linear", "linear_ops", "register",
           "shaped", "slim", "softmax"]
