"""Hugging Face interop: import/export of real architectures (see :mod:`jaxblocks.convert.hf`)."""

from jaxblocks.convert.architectures import ARCHITECTURES, UnsupportedError
from jaxblocks.convert.hf import HFModel, load, save
from jaxblocks.convert.safetensors_io import CheckpointError

__all__ = ["ARCHITECTURES", "CheckpointError", "HFModel", "UnsupportedError", "load", "save"]
