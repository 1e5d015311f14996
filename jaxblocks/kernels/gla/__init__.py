"""Chunked gated-linear-attention kernels (TPU Mosaic, GPU Triton) with context parallelism.

Use :func:`chunk_gla` from :mod:`jaxblocks.kernels.gla.api`; the math is defined by
:func:`jaxblocks.attention.linear_ops.chunk_gla` (the XLA reference).
"""

from jaxblocks.kernels.gla.api import chunk_gla

__all__ = ["chunk_gla"]
