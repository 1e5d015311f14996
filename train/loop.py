"""The training run: build everything from a :class:`~train.config.Config`, resume if a
checkpoint exists, train, evaluate, checkpoint, sample.

Every check that can fail on user input happens before the first compilation.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxblocks import model as jb_model
from jaxblocks import params as P
from jaxblocks import sharding as shd
from jaxblocks.errors import ConfigError

from train import checkpoint, flops, optim, step as step_lib
from train.config import Config, dump
from train.data import pipeline, sources, tokenizers
from train.reporting import Reporter

log = logging.getLogger("train")


class NonFiniteError(FloatingPointError):
  """The loss or gradient became NaN/Inf and ``train.on_nonfinite`` says to stop."""


class _Preemption:
  """Turns SIGTERM into a flag checked at step boundaries."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: leave signals alone.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """True on every process when any process was asked to stop."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def _replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _global_batch(local: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def _host(x) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _rng_to_json(key) -> list[int]:
  return [int(v) for v in np.asarray(jax.random.key_data(key)).ravel()]


def _rng_from_json(data) -> jax.Array:
  return jax.random.wrap_key_data(np.asarray(data, dtype=np.uint32))


def evaluate(eval_fn, params, model_state, batches, sharding) -> float | None:
  """Mean token loss over the held-out batches."""
  if not batches:
    return None
  total, count = 0.0, 0.0
  for b in batches:
    s, n = eval_fn(params, model_state, _global_batch(b, sharding))
    total += float(s)
    count += float(n)
  return total / max(count, 1.0)


def sample(params, cfg: Config, tokenizer, key) -> str:
  """Generate ``train.sample_tokens`` tokens after ``train.sample_prompt``."""
  prompt_ids = tokenizer.encode(cfg.train.sample_prompt)
  if prompt_ids.size == 0:
    prompt_ids = np.zeros((1,), np.int32)
  out = jb_model.generate(params, jnp.asarray(prompt_ids[None, :]), cfg.model, key,
                          max_new_tokens=cfg.train.sample_tokens,
                          temperature=cfg.train.sample_temperature, top_k=cfg.train.sample_top_k)
  return cfg.train.sample_prompt + tokenizer.decode(_host(out)[0].tolist())


def optimizer_state_shardings(abstract_opt, abstract_params, param_sh, replicated):
  """Each optimizer-state leaf that mirrors a parameter (same tree path suffix and shape, e.g.
  Adam's ``mu``/``nu``) takes that parameter's sharding; the rest (step counts, ...) replicated.

  (Read from the parameter layout rather than from XLA's propagation through ``optimizer.init``,
  which leaves freshly created zeros unsharded when compiling for devices that are not present.)
  """
  by_path = {}
  for (path, a), s in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                          jax.tree.leaves(param_sh)):
    by_path[jax.tree_util.keystr(path)] = (tuple(a.shape), s)

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    best = None
    for p, (shape, s) in by_path.items():
      if key.endswith(p) and shape == tuple(leaf.shape) and (best is None or len(p) > best[0]):
        best = (len(p), s)
    return replicated if best is None else best[1]

  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def train_state_layout(specs, optimizer, model_cfg, mesh, rules) -> tuple[dict, dict]:
  """Shardings and abstract values (``ShapeDtypeStruct`` with sharding) of the whole train state.

  Shared by the training run and the ahead-of-time compiler (``train.compile``), which passes a
  mesh of devices that need not be present (a TPU topology).
  """
  repl = _replicated(mesh)
  param_sh = P.shardings(specs, mesh, rules)
  abstract_params = P.abstract(specs, mesh, rules)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_sh = optimizer_state_shardings(abstract_opt, abstract_params, param_sh, repl)
  model_state0 = jb_model.init_state(model_cfg)
  model_state_sh = jax.tree.map(lambda _: repl, model_state0)
  state_sh = {"step": repl, "params": param_sh, "opt_state": opt_sh,
              "model_state": model_state_sh}
  abstract_state = {
      "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=repl),
      "params": abstract_params,
      "opt_state": jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract_opt, opt_sh),
      "model_state": jax.tree.map(
          lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.asarray(a).dtype, sharding=repl),
          model_state0),
  }
  return state_sh, abstract_state


def run(cfg: Config, stream=None) -> dict[str, Any]:
  """Train according to ``cfg``; returns a summary (first/last loss, eval loss, sample, step)."""
  cfg.validate()
  workdir = os.path.abspath(cfg.train.workdir)
  reporter = Reporter(cfg.logging, workdir, cfg.train.steps, stream)

  # -- everything that can fail on user input, before any compilation
  mesh = cfg.mesh.make()
  rules = shd.get_rules(cfg.mesh.rules)
  tokenizer = tokenizers.load(cfg.data.tokenizer, cfg.data.tokenizer_path)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer.vocab_size} ids")
  dp = cfg.mesh.data_parallel_size(mesh)
  micro = cfg.data.global_batch_size // cfg.optim.grad_accum_steps
  if micro % dp:
    raise ConfigError("data.global_batch_size", f"each micro-batch of {micro} sequences must "
                      f"split over the {dp}-way data-parallel mesh axes")
  lay = pipeline.layout(cfg.data, jax.process_index(), jax.process_count())
  docs = sources.documents(cfg.data)
  train_docs, eval_docs = pipeline.split(docs, cfg.data.eval_fraction)
  data_iter = iter(pipeline.train_dataset(cfg.data, tokenizer, train_docs, lay))
  eval_data = (pipeline.eval_batches(cfg.data, tokenizer, eval_docs, lay, cfg.train.eval_batches)
               )

  specs = jb_model.specs(cfg.model)
  optimizer, lr_schedule = optim.make(cfg.optim, specs, cfg.train.steps)
  repl = _replicated(mesh)
  state_sh, abstract_state = train_state_layout(specs, optimizer, cfg.model, mesh, rules)
  param_sh, opt_sh, model_state_sh = (state_sh["params"], state_sh["opt_state"],
                                      state_sh["model_state"])
  model_state0 = jb_model.init_state(cfg.model)

  # -- resume or initialise
  mgr = checkpoint.manager(os.path.join(workdir, "checkpoints"), cfg.checkpoint)
  restored = checkpoint.restore_latest(mgr, abstract_state, data_iter) if cfg.checkpoint.resume \
      else None
  if restored is not None:
    state, meta = restored
    start = int(meta["step"])
    rng = _rng_from_json(meta["rng"])
    reporter.print(f"resumed from {workdir}/checkpoints at step {start}")
  else:
    start = 0
    rng = jax.random.key(cfg.train.seed)
    init_key, rng = jax.random.split(rng)
    if cfg.train.init_from:
      from jaxblocks.convert import hf as hf_convert
      params = hf_convert.load_params(cfg.train.init_from, cfg.model, mesh, rules)
      reporter.print(f"initialised from {cfg.train.init_from}")
    else:
      params = jb_model.init(cfg.model, init_key, mesh, rules)
    state = {"params": params,
             "opt_state": jax.jit(optimizer.init, out_shardings=opt_sh)(params),
             "model_state": jax.device_put(model_state0, model_state_sh)}
  state["step"] = jax.device_put(jnp.asarray(start, jnp.int32), repl)
  if jax.process_index() == 0:
    dump(cfg, os.path.join(workdir, "config.yaml"))

  n_params = P.count(specs)
  reporter.print(f"model {n_params / 1e6:.2f}M params | mesh {dict(mesh.shape)} rules "
                 f"{cfg.mesh.rules} | {jax.device_count()} {jax.devices()[0].platform} devices, "
                 f"{jax.process_count()} processes | {len(train_docs)} train / {len(eval_docs)} "
                 f"eval documents")

  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(cfg.model, optimizer, lr_schedule,
                               grad_accum_steps=cfg.optim.grad_accum_steps, z_loss=cfg.train.z_loss),
      state_sh, mesh, rules)
  eval_fn = step_lib.jit_eval_step(step_lib.make_eval_step(cfg.model), param_sh,
                                   model_state_sh, mesh, rules)
  bsh = step_lib.batch_sharding(mesh, rules)
  tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
  flops_per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
  peak = flops.peak_flops_per_device()

  def meta(step_no: int) -> dict:
    return {"step": step_no, "rng": _rng_to_json(rng), "config": cfg.to_dict()}

  summary: dict[str, Any] = {"start_step": start, "first_loss": None, "last_loss": None,
                             "eval_loss": None, "sample": None, "preempted": False}
  step_no, skipped_in_row, last_saved = start, 0, start if restored is not None else -1
  t_log, steps_since_log = time.perf_counter(), 0
  t_start = time.perf_counter()
  try:
    with _Preemption() as preemption:
      while step_no < cfg.train.steps:
        batch = _global_batch(next(data_iter), bsh)
        state, metrics = train_step(state, batch)
        step_no += 1
        steps_since_log += 1
        if not bool(metrics["finite"]):
          if cfg.train.on_nonfinite == "stop":
            raise NonFiniteError(
                f"step {step_no}: the loss or gradient norm is NaN/Inf (loss="
                f"{float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}); the run "
                f"stopped without applying the update. Last checkpoint: "
                f"{'none' if last_saved < 0 else f'step {last_saved}'}. Lower optim.lr, enable "
                "optim.clip_norm or set train.on_nonfinite=skip.")
          skipped_in_row += 1
          log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                      step_no, skipped_in_row)
          if skipped_in_row >= cfg.train.max_skipped_steps:
            raise NonFiniteError(f"step {step_no}: {skipped_in_row} consecutive non-finite steps "
                                 "(train.max_skipped_steps); stopping")
        else:
          skipped_in_row = 0
        if summary["first_loss"] is None:
          summary["first_loss"] = float(metrics["loss"])
        if step_no % cfg.logging.every_steps == 0 or step_no == cfg.train.steps:
          host = {k: float(v) for k, v in metrics.items()}
          elapsed = time.perf_counter() - t_log
          tps = tokens_per_step * steps_since_log / max(elapsed, 1e-9)
          host["tokens_per_s"] = tps
          host["mfu"] = None if peak is None else tps * flops_per_token / (peak * jax.device_count())
          summary["last_loss"] = host["loss"]
          reporter.progress(step_no, host, time.perf_counter() - t_start, step_no - start)
          reporter.write(step_no, host)
          t_log, steps_since_log = time.perf_counter(), 0
        if cfg.train.eval_every and step_no % cfg.train.eval_every == 0 and eval_data:
          ev = evaluate(eval_fn, state["params"], state["model_state"], eval_data, bsh)
          summary["eval_loss"] = ev
          reporter.print(f"eval step {step_no} | loss {ev:.4f} | ppl {np.exp(ev):.2f}")
          reporter.write(step_no, {"loss": ev, "ppl": float(np.exp(ev))}, prefix="eval")
        if cfg.train.sample_every and step_no % cfg.train.sample_every == 0:
          text = sample(state["params"], cfg, tokenizer, jax.random.fold_in(rng, step_no))
          reporter.print(f"sample at step {step_no}:\n{text}")
          reporter.text(step_no, "sample", text)
        stop = preemption.agreed() or mgr.reached_preemption(step_no)
        periodic = cfg.checkpoint.every_steps and step_no % cfg.checkpoint.every_steps == 0
        final = cfg.checkpoint.save_final and step_no == cfg.train.steps
        if periodic or final or stop:
          checkpoint.save(mgr, state, data_iter, meta(step_no), force=True)
          last_saved = step_no
        if stop:
          reporter.print(f"SIGTERM/preemption: checkpoint saved at step {step_no}; exiting")
          summary["preempted"] = True
          break
    mgr.wait_until_finished()
    summary["step"] = step_no
    if not summary["preempted"]:
      if eval_data and not (cfg.train.eval_every and step_no % cfg.train.eval_every == 0
                            and step_no > start):
        ev = evaluate(eval_fn, state["params"], state["model_state"], eval_data, bsh)
        summary["eval_loss"] = ev
        reporter.print(f"final eval | loss {ev:.4f} | ppl {np.exp(ev):.2f}")
        reporter.write(step_no, {"loss": ev, "ppl": float(np.exp(ev))}, prefix="eval")
      if cfg.train.sample_tokens:
        text = sample(state["params"], cfg, tokenizer, jax.random.fold_in(rng, step_no))
        summary["sample"] = text
        reporter.print(f"--- sample after {step_no} steps ---\n{text}\n---")
        reporter.text(step_no, "sample", text)
    if summary["first_loss"] is not None:
      reporter.print(f"training loss: first step {summary['first_loss']:.4f} -> last "
                     f"{summary['last_loss']:.4f} ({step_no - start} steps in "
                     f"{time.perf_counter() - t_start:.0f}s)")
    summary["state"] = state
    return summary
  finally:
    mgr.wait_until_finished()
    mgr.close()
    data_iter.close() if hasattr(data_iter, "close") else None
    reporter.close()
