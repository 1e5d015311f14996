"""Flax NNX modules over the pure functions.

Every module holds ``nnx.Param`` variables created from the block's ``ParamSpec`` tree (the
logical axes become the variables' ``sharding_names`` metadata) and calls the same pure function
as the functional API in ``__call__``. They add no math of their own, so a model built here and
one built with ``jaxblocks.model`` agree exactly on the same weights.

    from flax import nnx
    from jaxblocks import nnx as jbnnx
    m = jbnnx.Model(cfg, rngs=nnx.Rngs(0))
    logits = m(tokens)

Stateful norms (``repbn``, ``prepbn``) keep their running statistics and the last training step
as ``nnx.BatchStat`` variables: call with ``training=True`` (optionally ``step=``; by default the
stored step + 1) to normalise with batch statistics and update them, otherwise the running
statistics are used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxblocks import blocks as blocks_lib
from jaxblocks import mlp as mlp_lib
from jaxblocks import model as model_lib
from jaxblocks import norms as norms_lib
from jaxblocks import params as P
from jaxblocks.attention import base as attn_base
from jaxblocks.attention.base import AttentionConfig
from jaxblocks.config import ModelConfig
from jaxblocks.context import Context
from jaxblocks.mlp import MlpConfig
from jaxblocks.norms import NormConfig


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


class SpecModule(nnx.Module):
  """A module whose parameters are described by a ``ParamSpec`` tree.

  ``params`` (optional) wraps existing values instead of initialising new ones; they are
  checked against the specs.
  """

  def __init__(self, specs, *, rngs: nnx.Rngs | None = None, params=None):
    if params is None:
      if rngs is None:
        raise ValueError(f"{type(self).__name__}: pass rngs=nnx.Rngs(seed) or params=...")
      params = P.init(specs, rngs.params())
    else:
      P.check_tree(params, specs, where=type(self).__name__)
    self.weights = nnx.data(jax.tree.map(
        lambda v, s: nnx.Param(v, out_sharding=s.logical_axes, eager_sharding=False),
        params, specs, is_leaf=P.is_spec))

  def pure_params(self):
    """The parameter values as the plain pytree the pure functions take."""
    return jax.tree.map(lambda v: v[...], self.weights, is_leaf=_is_var)


def _constant_init(specs):
  """Values of a spec tree whose initialisers are constants (running statistics, counters)."""
  return jax.tree.map(lambda s: s.init(jax.random.key(0), s.shape, s.dtype), specs,
                      is_leaf=P.is_spec)


def _stats(tree):
  return nnx.data(jax.tree.map(nnx.BatchStat, tree))


def _values(variables):
  return jax.tree.map(lambda v: v[...], variables, is_leaf=_is_var)


def _assign(variables, values) -> None:
  jax.tree.map(lambda v, a: v.set_value(a), variables, values, is_leaf=_is_var)


def _training_step(stored, step):
  return jnp.asarray(stored + 1 if step is None else step, jnp.int32)


class Norm(SpecModule):
  """One norm over the last axis; stateful kinds hold ``stats`` and ``step`` (``nnx.BatchStat``)."""

  def __init__(self, d: int, cfg: NormConfig = NormConfig(), *, role: str = "mlp", rngs=None,
               params=None):
    cfg.validate()
    self.cfg, self.role = cfg, role
    super().__init__(norms_lib.specs(d, cfg, role), rngs=rngs, params=params)
    if cfg.is_stateful:
      self.stats = _stats(_constant_init(norms_lib.state_specs(d, cfg)))
      self.step = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def __call__(self, x, *, training: bool = False, step=None, mask=None):
    """``mask`` (bool, ``x.shape[:-1]``): positions that count in the batch statistics."""
    if not self.cfg.is_stateful:
      return norms_lib.apply(self.pure_params(), x, self.cfg.for_role(self.role))
    step = _training_step(self.step[...], step) if training else self.step[...]
    y, new = norms_lib.apply_stateful(self.pure_params(), _values(self.stats), x, self.cfg,
                                      norms_lib.NormContext(training=training, step=step,
                                                            mask=mask))
    if training:
      _assign(self.stats, new)
      self.step.set_value(step)
    return y


class Mlp(SpecModule):
  def __init__(self, d_model: int, cfg: MlpConfig = MlpConfig(), *, init_std: float = 0.02,
               rngs=None, params=None):
    cfg.validate()
    self.cfg = cfg
    super().__init__(mlp_lib.specs(d_model, cfg, init_std), rngs=rngs, params=params)

  def __call__(self, x):
    return mlp_lib.apply(self.pure_params(), x, self.cfg)


class Attention(SpecModule):
  """Any registered attention kind (``softmax``, and the linear family)."""

  def __init__(self, d_model: int, cfg: AttentionConfig = AttentionConfig(), kind: str = "softmax",
               *, init_std: float = 0.02, rngs=None, params=None):
    cfg.validate(d_model)
    self.cfg, self.kind = cfg, kind
    super().__init__(attn_base.get(kind).specs(d_model, cfg, init_std), rngs=rngs, params=params)

  def __call__(self, x, positions=None, segment_ids=None):
    ctx = Context(positions=_positions(x, positions), segment_ids=segment_ids)
    y, _ = attn_base.get(self.kind).apply(self.pure_params(), x, self.cfg, ctx, None)
    return y


class Block(SpecModule):
  """One residual layer with the topology of ``cfg.block``."""

  def __init__(self, cfg: ModelConfig, kind: str | None = None, *, rngs=None, params=None):
    cfg.validate()
    self.cfg = cfg
    self.kind = cfg.attention_pattern[0] if kind is None else kind
    super().__init__(blocks_lib.specs(cfg, self.kind), rngs=rngs, params=params)

  def __call__(self, x, positions=None, segment_ids=None, layer_idx: int = 0):
    ctx = Context(positions=_positions(x, positions), segment_ids=segment_ids,
                  layer_idx=layer_idx, n_layers=self.cfg.n_layers)
    y, _ = blocks_lib.apply(self.pure_params(), x, self.cfg, ctx, self.kind, None)
    return y


class Model(SpecModule):
  """The decoder LM of ``jaxblocks.model``; with stateful norms the model state
  (:func:`jaxblocks.model.init_state`) lives in ``state`` as ``nnx.BatchStat`` variables."""

  def __init__(self, cfg: ModelConfig, *, rngs=None, params=None, state=None):
    cfg.validate()
    self.cfg = cfg
    super().__init__(model_lib.specs(cfg), rngs=rngs, params=params)
    if cfg.norm.is_stateful:
      if state is None:
        state = model_lib.init_state(cfg)
      else:
        P.check_tree(state, model_lib.state_specs(cfg), where="Model state")
      self.state = _stats(state)

  def model_state(self):
    """The model state as the plain pytree ``jaxblocks.model`` takes (``{}`` when stateless)."""
    return _values(self.state) if self.cfg.norm.is_stateful else {}

  def __call__(self, tokens, positions=None, segment_ids=None, *, training: bool = False,
               step=None):
    """Logits. ``training`` with stateful norms normalises with batch statistics and updates
    the running ones (``step`` drives the PRepBN schedule; default: the stored step + 1)."""
    if not self.cfg.norm.is_stateful:
      return model_lib.apply(self.pure_params(), tokens, self.cfg, positions=positions,
                             segment_ids=segment_ids, training=training)
    state = self.model_state()
    if not training:
      return model_lib.apply(self.pure_params(), tokens, self.cfg, positions=positions,
                             segment_ids=segment_ids, state=state)
    logits, new_state = model_lib.apply_train(
        self.pure_params(), state, tokens, self.cfg, step=_training_step(state["step"], step),
        positions=positions, segment_ids=segment_ids)
    _assign(self.state, new_state)
    return logits

  def generate(self, prompt, key=None, max_new_tokens: int = 32, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None):
    return model_lib.generate(self.pure_params(), prompt, self.cfg, key, max_new_tokens,
                              temperature, top_k, top_p,
                              state=self.model_state() if self.cfg.norm.is_stateful else None)


def _positions(x, positions):
  if positions is not None:
    return positions
  b, t = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
