"""Pallas kernels, one sub-package per family, each with an XLA reference path."""
