"""Reading and writing Hugging Face safetensors checkpoints (single file or index + shards).

Only the ``safetensors`` library is used (numpy framework): no torch, no pickle. Reads are
slice-wise (``safe_open(...).get_slice``), so a process reads only the parts of the tensors its
devices hold.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from jaxblocks.convert.lazy import Index

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A malformed or incompatible checkpoint; the message names the file, tensor or key."""


def _safetensors():
  try:
    import safetensors  # noqa: F401
    from safetensors import safe_open
  except ImportError as e:  # pragma: no cover - safetensors is a dependency
    raise ImportError("reading Hugging Face checkpoints needs the 'safetensors' package "
                      "(pip install safetensors)") from e
  return safe_open


def read_config(model_dir: str) -> dict:
  """The checkpoint's ``config.json`` as a dict."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.isdir(model_dir):
    raise CheckpointError(f"{model_dir}: not a directory")
  if not os.path.exists(path):
    raise CheckpointError(f"{model_dir}: no config.json (a Hugging Face model directory holds "
                          "config.json and model.safetensors or model.safetensors.index.json)")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: invalid JSON ({e})") from None


class SafetensorsReader:
  """Tensor metadata and slice reads over the shards of one checkpoint directory."""

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    index_path = os.path.join(model_dir, INDEX_FILE)
    single_path = os.path.join(model_dir, SINGLE_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
      if not isinstance(weight_map, Mapping):
        raise CheckpointError(f"{index_path}: no 'weight_map'")
      self.weight_map = dict(weight_map)
    elif os.path.exists(single_path):
      self.weight_map = None
    else:
      if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(model_dir)):
        raise CheckpointError(f"{model_dir}: only pickle-based weights (.bin/.pt); convert them to "
                              "safetensors first (pickle files are never loaded)")
      raise CheckpointError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    self._files: dict[str, object] = {}
    self._slices: dict[str, object] = {}
    if self.weight_map is None:
      self.weight_map = {name: SINGLE_FILE for name in self._open(SINGLE_FILE).keys()}
    missing = sorted({f for f in self.weight_map.values()
                      if not os.path.exists(os.path.join(model_dir, f))})
    if missing:
      raise CheckpointError(f"{model_dir}: missing shard file(s) {missing} listed in {INDEX_FILE}")

  def _open(self, filename: str):
    if filename not in self._files:
      safe_open = _safetensors()
      path = os.path.join(self.model_dir, filename)
      try:
        self._files[filename] = safe_open(path, framework="np")
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: cannot open as safetensors ({e})") from None
    return self._files[filename]

  def names(self) -> list[str]:
    return sorted(self.weight_map)

  def _slice(self, name: str):
    if name not in self._slices:
      if name not in self.weight_map:
        raise CheckpointError(f"{self.model_dir}: tensor '{name}' not found in the checkpoint")
      self._slices[name] = self._open(self.weight_map[name]).get_slice(name)
    return self._slices[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def dtype(self, name: str) -> str:
    return self._slice(name).get_dtype()

  def read_slice(self, name: str, index: Index) -> np.ndarray:
    sl = self._slice(name)
    return np.asarray(sl[index] if index else sl[...])


def _numpy_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(dtype)


class ArraySink:
  """Collects full tensors written slice by slice (export), then saves them."""

  def __init__(self, dtype: str = "float32"):
    self.dtype = _numpy_dtype(dtype)
    self.tensors: dict[str, np.ndarray] = {}

  def write_slice(self, name, shape, index, value):
    if name not in self.tensors:
      self.tensors[name] = np.zeros(shape, self.dtype)
    self.tensors[name][index] = value

  def save(self, model_dir: str, max_shard_bytes: int = 4 << 30) -> list[str]:
    """Write ``model.safetensors`` (or shards + index when larger than ``max_shard_bytes``)."""
    from safetensors.numpy import save_file
    os.makedirs(model_dir, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(self.tensors):
      t = self.tensors[name]
      if shards[-1] and size + t.nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = np.ascontiguousarray(t)
      size += t.nbytes
    meta = {"format": "np"}
    if len(shards) == 1:
      save_file(shards[0], os.path.join(model_dir, SINGLE_FILE), metadata=meta)
      return [SINGLE_FILE]
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(model_dir, fname), metadata=meta)
      files.append(fname)
      weight_map.update({n: fname for n in shard})
    total = sum(t.nbytes for t in self.tensors.values())
    with open(os.path.join(model_dir, INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
