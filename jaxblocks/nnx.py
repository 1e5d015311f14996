"""Flax NNX modules over the pure functions.

Every module holds ``nnx.Param`` variables created from the block's ``ParamSpec`` tree (the
logical axes become the variables' ``sharding_names`` metadata) and calls the same pure function
as the functional API in ``__call__``. They add no math of their own, so a model built here and
one built with ``jaxblocks.model`` agree exactly on the same weights.

    from flax import nnx
    from jaxblocks import nnx as jbnnx
    m = jbnnx.Model(cfg, rngs=nnx.Rngs(0))
    logits = m(tokens)
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


class Norm(SpecModule):
  def __init__(self, d: int, cfg: NormConfig = NormConfig(), *, rngs=None, params=None):
    cfg.validate()
    self.cfg = cfg
    super().__init__(norms_lib.specs(d, cfg), rngs=rngs, params=params)

  def __call__(self, x):
    return norms_lib.apply(self.pure_params(), x, self.cfg)


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
  """The decoder LM of ``jaxblocks.model``."""

  def __init__(self, cfg: ModelConfig, *, rngs=None, params=None):
    cfg.validate()
    self.cfg = cfg
    super().__init__(model_lib.specs(cfg), rngs=rngs, params=params)

  def __call__(self, tokens, positions=None, segment_ids=None):
    return model_lib.apply(self.pure_params(), tokens, self.cfg, positions=positions,
                           segment_ids=segment_ids)

  def generate(self, prompt, key=None, max_new_tokens: int = 32, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None):
    return model_lib.generate(self.pure_params(), prompt, self.cfg, key, max_new_tokens,
                              temperature, top_k, top_p)


def _positions(x, positions):
  if positions is not None:
    return positions
  b, t = x.shape[:2]
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
