"""``CheckpointConfig`` and Orbax checkpointing of the whole training state.

Layout (read by other tools; keep it stable): an Orbax ``CheckpointManager`` at
``<workdir>/checkpoints``; each step directory holds the composite items

* ``params``      the model parameter pytree (``StandardSave``),
* ``opt_state``   the optax state (``StandardSave``),
* ``model_state`` non-trainable model state (``StandardSave``; an empty JSON object while the
  model keeps none, since Orbax refuses empty pytrees),
* ``data``        the grain iterator state of every data shard (``shard_<s>-of-<n>.json``, written
  by the process that owns the shard; any process count dividing ``n`` resumes it),
* ``meta``        JSON: ``step``, ``rng`` (key data) and the resolved config dict.

Saves are asynchronous. Restores take an abstract target carrying the *current* mesh's
shardings, so a run resumes on a different device count or mesh shape. A latest checkpoint
that cannot be read (left incomplete or damaged) is skipped with a warning and the previous one
is used; the damaged one is moved aside to ``<workdir>/checkpoints_damaged/`` (never deleted),
so the step can be written again and nothing is lost. A checkpoint that is intact but does not fit
the current configuration (another ``data.num_shards``) is an error, never moved aside.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxblocks.errors import ConfigError, check_int

log = logging.getLogger("train.checkpoint")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpointing: every ``every_steps`` steps (0 disables periodic saves; the final step is
  always saved when ``save_final``), keep the last ``keep_last`` plus every ``keep_every``-th step
  (0: none), asynchronous writes unless ``async_save`` is false, ``resume`` from the latest
  complete checkpoint in the work dir."""

  every_steps: int = 100
  keep_last: int = 3
  keep_every: int = 0
  async_save: bool = True
  save_final: bool = True
  resume: bool = True

  def validate(self, prefix: str = "checkpoint") -> "CheckpointConfig":
    check_int(f"{prefix}.every_steps", self.every_steps, minimum=0)
    check_int(f"{prefix}.keep_last", self.keep_last, minimum=1)
    check_int(f"{prefix}.keep_every", self.keep_every, minimum=0)
    if self.keep_every and self.every_steps and self.keep_every % self.every_steps:
      raise ConfigError(f"{prefix}.keep_every", f"{self.keep_every} is not a multiple of "
                        f"checkpoint.every_steps={self.every_steps}, so no saved step would be kept")
    return self


def manager(directory: str, cfg: CheckpointConfig) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.keep_last, keep_period=cfg.keep_every or None,
      enable_async_checkpointing=cfg.async_save, create=True)
  return ocp.CheckpointManager(directory, options=options)


def _model_state_arg(model_state, restore: bool):
  if not jax.tree.leaves(model_state):
    return ocp.args.JsonRestore() if restore else ocp.args.JsonSave({})
  return ocp.args.StandardRestore(model_state) if restore else ocp.args.StandardSave(model_state)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class DataLayoutError(ConfigError):
  """The checkpoint's data iterator state was written for another number of data shards."""


_SHARD_FILE = re.compile(r"shard_(\d+)-of-(\d+)\.json")


class ShardedDataHandler:
  """Orbax handler of the trainer's data iterator (``pipeline.ShardedIterator``): every process
  writes the state of the shards it owns, one JSON file per shard, and restores the shards it
  owns now from whichever process wrote them."""

  def save(self, directory, args=None, item=None):
    it = item if item is not None else args.item
    for shard, state in it.get_state().items():
      (directory / f"shard_{shard}-of-{it.num_shards}.json").write_text(json.dumps(state))

  def restore(self, directory, args=None, item=None):
    it = item if item is not None else args.item
    found = {m.groups() for f in directory.iterdir() if (m := _SHARD_FILE.fullmatch(f.name))}
    counts = sorted({int(n) for _, n in found})
    if counts and it.num_shards not in counts:
      raise DataLayoutError("data.num_shards", f"is {it.num_shards}, but the checkpoint's data "
                            f"state was written with {counts[0]} shards; resume with "
                            f"data.num_shards={counts[0]}")
    state = {}
    for shard in it.get_state():
      path = directory / f"shard_{shard}-of-{it.num_shards}.json"
      if not path.exists():
        raise ValueError(f"data state file {path.name} is missing")
      state[shard] = json.loads(path.read_text())
    it.set_state(state)
    return it

  def metadata(self, directory):
    del directory
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(ShardedDataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ShardedDataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


def save(mgr: ocp.CheckpointManager, state: dict, data_iterator, meta: dict[str, Any],
         force: bool = False) -> bool:
  """Save ``state`` (params, opt_state, model_state) with the data iterator and ``meta``.

  Refuses (raises) when any parameter is not finite. Returns whether a save was started.
  """
  if not bool(_all_finite(state["params"])):
    raise FloatingPointError(f"refusing to checkpoint step {meta['step']}: parameters contain "
                             "NaN or Inf")
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(state["params"]),
      opt_state=ocp.args.StandardSave(state["opt_state"]),
      model_state=_model_state_arg(state["model_state"], restore=False),
      data=DataSave(data_iterator),
      meta=ocp.args.JsonSave(meta))
  return mgr.save(int(meta["step"]), args=args, force=force)


def _move_aside(mgr: ocp.CheckpointManager, step: int) -> str:
  """Move a damaged step directory out of the manager's directory so the step can be rewritten."""
  import time
  src = None
  for child in mgr.directory.iterdir():
    name = child.name
    if name == str(step) or (name.split("_")[-1] == str(step) and name.split("_")[-1].isdigit()):
      src = child
      break
  dest_root = mgr.directory.parent / (mgr.directory.name + "_damaged")
  dest = dest_root / f"{step}-{int(time.time())}"
  if jax.process_index() == 0 and src is not None:
    dest_root.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"jaxblocks_move_damaged_{step}")
  mgr.reload()
  return str(dest)


def restore_latest(mgr: ocp.CheckpointManager, abstract_state: dict, data_iterator):
  """Restore the newest readable checkpoint into ``abstract_state``'s shapes and shardings.

  Returns ``(state_without_step, meta)`` or ``None`` when there is none. Unreadable newer
  checkpoints are skipped with a warning.
  """
  for step in sorted(mgr.all_steps(), reverse=True):
    args = ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state["params"]),
        opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
        model_state=_model_state_arg(abstract_state["model_state"], restore=True),
        data=DataRestore(data_iterator),
        meta=ocp.args.JsonRestore())
    try:
      restored = mgr.restore(step, args=args)
    except DataLayoutError:
      raise
    except Exception as e:  # A damaged checkpoint may fail anywhere inside Orbax/TensorStore.
      if isinstance(e.__cause__, DataLayoutError) or isinstance(e.__context__, DataLayoutError):
        raise (e.__cause__ or e.__context__) from None
      moved = _move_aside(mgr, step)
      log.warning("checkpoint at step %d is incomplete or damaged and is skipped; moved to %s "
                  "(%s: %s)", step, moved, type(e).__name__,
                  str(e).splitlines()[0][:200] if str(e) else "")
      continue
    model_state = restored["model_state"]
    if not jax.tree.leaves(abstract_state["model_state"]):
      model_state = abstract_state["model_state"]
    state = {"params": restored["params"], "opt_state": restored["opt_state"],
             "model_state": model_state}
    return state, dict(restored["meta"])
  return None
