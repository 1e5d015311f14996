"""The train and eval steps: pure functions of ``(state, batch)``, jitted once with in/out
shardings from the parameter specs and the mesh rules.

``TrainState`` is a dict pytree ``{"step", "params", "opt_state", "model_state"}``. The loss is
next-token cross-entropy over ``tokens[:, 1:]``, masked at padding (segment 0) and at document
boundaries (a token is never asked to predict the first token of the next packed document),
plus an optional z-loss ``z_loss * logsumexp(logits)**2``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxblocks import model as jb_model
from jaxblocks import sharding as shd
from jaxblocks.config import ModelConfig

State = dict[str, Any]


def split_batch(batch):
  """Inputs, targets and loss mask from a packed batch of ``seq_len + 1`` token rows."""
  tokens, seg, pos = batch["tokens"], batch["segment_ids"], batch["positions"]
  inputs = {"tokens": tokens[:, :-1], "segment_ids": seg[:, :-1], "positions": pos[:, :-1]}
  targets = tokens[:, 1:]
  mask = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  return inputs, targets, mask


def token_losses(logits_btv, targets_bt, z_loss: float):
  """Per-token cross-entropy (+ z-loss) in float32, and the log-partition for metrics."""
  logits = logits_btv.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  ce = lse - target_logit
  return ce, ce + z_loss * jnp.square(lse)


def _loss_sums(params, model_state, batch, cfg: ModelConfig, step, z_loss: float):
  inputs, targets, mask = split_batch(batch)
  logits, new_state = jb_model.apply_train(params, model_state, inputs["tokens"], cfg, step=step,
                                           positions=inputs["positions"],
                                           segment_ids=inputs["segment_ids"])
  ce, total = token_losses(logits, targets, z_loss)
  m = mask.astype(jnp.float32)
  return (jnp.sum(total * m), jnp.sum(ce * m)), new_state


def make_train_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, lr_schedule,
                    *, grad_accum_steps: int, z_loss: float):
  """``(state, batch) -> (state, metrics)``: forward, backward over micro-batches, update.

  A step whose loss or gradient is not finite leaves the parameters and optimizer state
  unchanged (metrics report ``finite = False``); the loop then stops or carries on according to
  ``train.on_nonfinite``. The step counter always advances (the batch was consumed).
  """

  def grads_of(params, model_state, batch, step, n_tokens):
    def scaled(p, s, b):
      (total, ce), new_s = _loss_sums(p, s, b, cfg, step, z_loss)
      return total / n_tokens, (ce, new_s)

    return jax.value_and_grad(scaled, has_aux=True)(params, model_state, batch)

  def train_step(state: State, batch) -> tuple[State, dict]:
    params, model_state, step = state["params"], state["model_state"], state["step"]
    _, _, mask = split_batch(batch)
    n_tokens = jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)
    if grad_accum_steps == 1:
      (loss, (ce_sum, new_model_state)), grads = grads_of(params, model_state, batch, step,
                                                           n_tokens)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)

      def body(carry, mb):
        g_acc, loss_acc, ce_acc, ms = carry
        (loss, (ce, ms)), g = grads_of(params, ms, mb, step, n_tokens)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        return (g_acc, loss_acc + loss, ce_acc + ce, ms), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
      (grads, loss, ce_sum, new_model_state), _ = jax.lax.scan(
          body, (zeros, jnp.float32(0), jnp.float32(0), model_state), micro)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)

    def keep(new, old):
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = {
        "step": step + 1,
        "params": keep(new_params, params),
        "opt_state": keep(new_opt_state, state["opt_state"]),
        "model_state": keep(new_model_state, model_state),
    }
    ce = ce_sum / n_tokens
    metrics = {"loss": ce, "total_loss": loss, "ppl": jnp.exp(ce), "grad_norm": grad_norm,
               "lr": jnp.asarray(lr_schedule(step), jnp.float32), "tokens": n_tokens,
               "finite": finite}
    return new_state, metrics

  return train_step


def make_eval_step(cfg: ModelConfig):
  """``(params, model_state, batch) -> (sum of token losses, number of tokens)``."""

  def eval_step(params, model_state, batch):
    inputs, targets, mask = split_batch(batch)
    logits = jb_model.apply(params, inputs["tokens"], cfg, positions=inputs["positions"],
                            segment_ids=inputs["segment_ids"])
    ce, _ = token_losses(logits, targets, 0.0)
    m = mask.astype(jnp.float32)
    return jnp.sum(ce * m), jnp.sum(m)

  return eval_step


def batch_sharding(mesh, rules):
  """Sharding of ``[batch, time]`` input arrays."""
  return jax.sharding.NamedSharding(mesh, shd.logical_to_spec(("batch", None), rules, mesh))


def jit_train_step(step_fn, state_shardings, mesh, rules):
  """The jitted train step: state donated, shardings fixed, activations constrained."""
  bsh = batch_sharding(mesh, rules)
  batch_sh = {"tokens": bsh, "segment_ids": bsh, "positions": bsh}
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def wrapped(state, batch):
    with shd.use_rules(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(wrapped, in_shardings=(state_shardings, batch_sh),
                 out_shardings=(state_shardings, repl), donate_argnums=(0,))


def jit_eval_step(eval_fn, param_shardings, model_state_shardings, mesh, rules):
  bsh = batch_sharding(mesh, rules)
  batch_sh = {"tokens": bsh, "segment_ids": bsh, "positions": bsh}

  def wrapped(params, model_state, batch):
    with shd.use_rules(mesh, rules):
      return eval_fn(params, model_state, batch)

  return jax.jit(wrapped, in_shardings=(param_shardings, model_state_shardings, batch_sh))
