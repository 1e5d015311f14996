"""Import Hugging Face checkpoints into jaxblocks and export them back.

``load(model_dir, mesh=, rules=)`` reads ``config.json`` and the safetensors shards, maps them to a
:class:`ModelConfig` and a params tree, and places each parameter straight onto the mesh with its
spec's sharding: every device's shard is read from the file on its own
(``jax.make_array_from_callback`` over ``safe_open(...).get_slice``), so no process ever holds more
than its devices' part of the model. ``save(model, out_dir)`` writes ``config.json`` and
``model.safetensors`` (sharded with an index when large) in the architecture's layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np

from jaxblocks import model as model_lib
from jaxblocks import params as P
from jaxblocks.config import ModelConfig
from jaxblocks.convert import architectures
from jaxblocks.convert.architectures import UnsupportedError
from jaxblocks.convert.lazy import Expr, normalize_index
from jaxblocks.convert.safetensors_io import (ArraySink, CheckpointError, SafetensorsReader,
                                              read_config)

# Keys of config.json carried over unchanged on export (token ids and the like).
PASSTHROUGH_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass
class HFModel:
  """An imported (or to-be-exported) model: its config, params and HF architecture name."""

  config: ModelConfig
  params: Any
  architecture: str
  hf_config: dict = dataclasses.field(default_factory=dict)


def _is_expr(x) -> bool:
  return isinstance(x, Expr)


def _check_layout(layout, specs, reader: SafetensorsReader | None, arch: str):
  """The layout covers exactly the parameter tree with matching shapes; every referenced tensor
  exists in the checkpoint with the expected shape, and no checkpoint tensor is left unused."""
  layout_struct = jax.tree.structure(layout, is_leaf=_is_expr)
  spec_struct = jax.tree.structure(specs, is_leaf=P.is_spec)
  if layout_struct != spec_struct:  # an internal inconsistency of an architecture mapping
    raise AssertionError(f"{arch}: layout tree {layout_struct} != parameter tree {spec_struct}")
  for expr, spec in zip(jax.tree.leaves(layout, is_leaf=_is_expr),
                        jax.tree.leaves(specs, is_leaf=P.is_spec)):
    if tuple(expr.shape) != tuple(spec.shape):
      raise AssertionError(f"{arch}: layout shape {expr.shape} != parameter shape {spec.shape}")
  if reader is None:
    return
  used = set()
  for expr in jax.tree.leaves(layout, is_leaf=_is_expr):
    for leaf in expr.leaves():
      used.add(leaf.name)
      if leaf.name not in reader.weight_map:
        raise CheckpointError(f"{reader.model_dir}: tensor '{leaf.name}' expected by {arch} is "
                              "missing from the checkpoint")
      got = reader.shape(leaf.name)
      if got != leaf.shape:
        raise CheckpointError(f"{reader.model_dir}: tensor '{leaf.name}' has shape {list(got)}, "
                              f"expected {list(leaf.shape)} from config.json")
  unused = sorted(set(reader.names()) - used)
  unused = [n for n in unused if not n.endswith((".rotary_emb.inv_freq", ".attn.bias",
                                                 ".attn.masked_bias", ".attention.bias",
                                                 ".attention.masked_bias"))]
  if unused:
    hint = (" (an untied output head while config.json says tie_word_embeddings=true?)"
            if any("lm_head" in n or "embed_out" in n for n in unused) else "")
    raise CheckpointError(f"{reader.model_dir}: checkpoint tensors not used by {arch}: "
                          f"{unused[:8]}{'...' if len(unused) > 8 else ''}{hint}")


def _place(expr: Expr, spec: P.ParamSpec, reader, sharding, dtype):
  shape = tuple(spec.shape)

  def read(index):
    return np.asarray(expr.read(reader, normalize_index(index, shape)), dtype=dtype)

  if sharding is None:
    return jax.device_put(read(tuple(slice(None) for _ in shape)))
  return jax.make_array_from_callback(shape, sharding, read)


def inspect(model_dir: str) -> tuple[ModelConfig, str]:
  """``(model config, architecture)`` of a checkpoint, after checking every tensor's presence and
  shape (metadata only; no weights are read)."""
  hf = read_config(model_dir)
  arch = architectures.for_config(hf)
  cfg = arch.to_config(hf).validate()
  _check_layout(arch.layout(cfg), model_lib.specs(cfg), SafetensorsReader(model_dir), arch.name)
  return cfg, arch.name


def load_params(model_dir: str, cfg: ModelConfig, mesh=None, rules=None):
  """The params of checkpoint ``model_dir`` for a model configured as ``cfg`` (e.g. a training
  config's ``model`` section): the checkpoint's architecture must compute the same function
  (scan/remat/dtype settings may differ); ``cfg.param_dtype`` is used. Raises ``ConfigError``
  naming every differing key."""
  from jaxblocks.errors import ConfigError
  hf = read_config(model_dir)
  imported_cfg = architectures.for_config(hf).to_config(hf)
  diff = architectures.config_differences(cfg, imported_cfg)
  if diff:
    raise ConfigError("train.init_from", f"{model_dir} does not match the model config: "
                      + ", ".join(f"model.{k}={w!r} but the checkpoint has {g!r}"
                                  for k, w, g in diff)
                      + " (jaxblocks-convert import prints the matching model section)")
  return load(model_dir, mesh, rules, param_dtype=cfg.param_dtype).params


def load(model_dir: str, mesh: jax.sharding.Mesh | None = None, rules=None,
         param_dtype: str | None = None) -> HFModel:
  """Import a local Hugging Face model directory (``config.json`` + safetensors).

  With ``mesh``, every parameter is created sharded by its spec's logical axes under ``rules``
  and each device's shard is read from the checkpoint on its own (multi-host safe: a process
  reads only what its devices hold). ``param_dtype`` overrides the stored dtype (default
  float32). Raises :class:`CheckpointError` / :class:`UnsupportedError` naming the problem.
  """
  hf = read_config(model_dir)
  arch = architectures.for_config(hf)
  cfg = arch.to_config(hf)
  if param_dtype is not None:
    cfg = cfg.replace(param_dtype=param_dtype)
  cfg.validate()
  reader = SafetensorsReader(model_dir)
  specs = model_lib.specs(cfg)
  layout = arch.layout(cfg)
  _check_layout(layout, specs, reader, arch.name)
  dtype = cfg.weight_dtype
  spec_leaves, treedef = jax.tree.flatten(specs, is_leaf=P.is_spec)
  shard_leaves = (jax.tree.leaves(P.shardings(specs, mesh, rules), is_leaf=lambda x: isinstance(
      x, jax.sharding.Sharding)) if mesh is not None else [None] * len(spec_leaves))
  leaves = [_place(e, s, reader, sh, dtype) for e, s, sh in
            zip(jax.tree.leaves(layout, is_leaf=_is_expr), spec_leaves, shard_leaves)]
  extra = {k: hf[k] for k in PASSTHROUGH_KEYS if k in hf}
  return HFModel(cfg, jax.tree.unflatten(treedef, leaves), arch.name, extra)


def _host_value(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def save(hf_model: HFModel, out_dir: str, dtype: str = "float32",
         max_shard_bytes: int = 4 << 30) -> list[str]:
  """Export to ``out_dir`` in ``hf_model.architecture``'s Hugging Face layout; returns the
  safetensors files written. Raises :class:`UnsupportedError` naming every config key the
  architecture cannot express. (Multi-host: every process must call it; all gather the weights
  and only process 0 writes.)"""
  arch = architectures.get(hf_model.architecture)
  cfg = hf_model.config
  hf = arch.to_hf_config(cfg)
  hf.update({k: v for k, v in hf_model.hf_config.items() if k in PASSTHROUGH_KEYS})
  hf["dtype"] = dtype
  specs = model_lib.specs(cfg)
  P.check_tree(hf_model.params, specs, "params")
  layout = arch.layout(cfg)
  _check_layout(layout, specs, None, arch.name)
  sink = ArraySink(dtype)
  for expr, value in zip(jax.tree.leaves(layout, is_leaf=_is_expr),
                         jax.tree.leaves(hf_model.params)):
    expr.write(sink, _host_value(value).astype(np.float32))
  if jax.process_index() != 0:
    return []
  files = sink.save(out_dir, max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  return files


__all__ = ["HFModel", "inspect", "load", "load_params", "save", "CheckpointError", "UnsupportedError"]
