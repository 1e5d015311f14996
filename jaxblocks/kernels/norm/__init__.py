"""Fused residual-add + RMSNorm/LayerNorm (+ swish output gate) kernels for TPU and GPU.

Use :func:`fused_add_norm` / :func:`norm` from :mod:`jaxblocks.kernels.norm.api`; the math is
defined by :mod:`jaxblocks.kernels.norm.reference`.
"""

from jaxblocks.kernels.norm.api import fused_add_norm, norm

__all__ = ["fused_add_norm", "norm"]
