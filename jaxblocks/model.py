"""Decoder-only language model: embedding, a stack of blocks (scanned or unrolled), head, and
KV-cache / recurrent-state generation.

Parameters are one pytree::

    {"embed": {"tokens": [vocab, d], "positions"?: [max_seq_len, d]},
     "layers": [block params of pattern position 0, ..., P-1]   # each stacked [n_layers/P, ...]
     "final_norm"?: ..., "head"?: {"w": [d, vocab], "b"?: [vocab]}}

Layer ``l`` uses pattern position ``l % P`` and repetition ``l // P``. The scanned and the
unrolled model use the same parameter layout, so they are interchangeable.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxblocks import blocks
from jaxblocks import norms
from jaxblocks import params as P
from jaxblocks import sharding
from jaxblocks.attention import base as attn_base
from jaxblocks.config import ModelConfig
from jaxblocks.context import Context

# ----------------------------------------------------------------------------- specs


def specs(cfg: ModelConfig):
  """The full parameter-spec tree of a model."""
  cfg.validate()
  d, v = cfg.d_model, cfg.vocab_size
  s = {"embed": {"tokens": P.ParamSpec((v, d), ("vocab", "embed"), P.normal(cfg.init_std))}}
  if cfg.position_embedding == "learned":
    s["embed"]["positions"] = P.ParamSpec((cfg.max_seq_len, d), (None, "embed"),
                                          P.normal(cfg.init_std))
  if cfg.norm.uses_embed_scale:
    s["embed"]["scale"] = P.ParamSpec((), (), P.constant(math.sqrt(d)))
  if cfg.block.embed_norm:
    s["embed_norm"] = norms.specs(d, cfg.norm, "embed")
  s["layers"] = [P.stack(blocks.specs(cfg, kind), cfg.repeats) for kind in cfg.attention_pattern]
  hooks = blocks.stream_hooks(cfg)
  if hooks is not None and hooks.model_specs(cfg):
    s["topology"] = hooks.model_specs(cfg)
  if cfg.layer_tying.unique_layers is not None:
    _tied_specs(s, cfg)
  if cfg.precomputed_first_layer:
    from jaxblocks.tricks import precompute_first_layer
    precompute_first_layer.adapt_specs(s, cfg)
  if cfg.final_norm:
    s["final_norm"] = norms.specs(d, cfg.norm.final(), "final")
  if not cfg.tie_embeddings:
    s["head"] = {"w": P.ParamSpec((d, v), ("embed", "vocab"), P.normal(cfg.init_std))}
    if cfg.head_bias:
      s["head"]["b"] = P.ParamSpec((v,), ("vocab",), P.zeros)
  if cfg.param_dtype != "float32":
    s = jax.tree.map(lambda x: P.ParamSpec(x.shape, x.logical_axes, x.init, cfg.weight_dtype), s,
                     is_leaf=P.is_spec)
  return s


def init(cfg: ModelConfig, key: jax.Array, mesh=None, rules=None):
  """Initialise all parameters in one jit (sharded over ``mesh`` when given)."""
  return P.init(specs(cfg), key, mesh, rules)


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
  """Number of scalar parameters (tied layers counted once, LoRA deltas included)."""
  s = specs(cfg)
  n = P.count(s)
  if non_embedding:
    n -= P.count(s["embed"])
  return n


# ----------------------------------------------------------------------------- layer tying
#
# With ``layer_tying.unique_layers = K`` the stacks in ``params["layers"]`` hold K / period sets
# per pattern position; layer ``l`` uses set ``l % K``. A LoRA relaxation adds
# ``params["layer_lora"]``: per pattern position, a dict from weight path (e.g. ``attn/wq``) to
# ``{"a": [repeats, *in, r], "b": [repeats, r, *out]}``, the delta of every layer.


def _lora_split(spec: P.ParamSpec) -> int | None:
  """How many leading axes of a weight are its input (None: not a residual-stream matrix)."""
  if len(spec.shape) < 2:
    return None
  if spec.logical_axes[0] == "embed":
    return 1
  if spec.logical_axes[-1] == "embed":
    return len(spec.shape) - 1
  return None


def _lora_specs(block_specs, rank: int, n: int):
  out = {}
  for path, spec in P.flatten_dict(block_specs).items():
    k = _lora_split(spec)
    if k is None:
      continue
    fan_in = math.prod(spec.shape[:k])
    out[path] = {
        "a": P.ParamSpec((*spec.shape[:k], rank), (*spec.logical_axes[:k], None),
                         P.normal(fan_in ** -0.5)),
        "b": P.ParamSpec((rank, *spec.shape[k:]), (None, *spec.logical_axes[k:]), P.zeros),
    }
  return P.stack(out, n)


def _tied_specs(s, cfg: ModelConfig):
  sets = cfg.layer_tying.unique_layers // cfg.period
  s["layers"] = [P.stack(blocks.specs(cfg, kind), sets) for kind in cfg.attention_pattern]
  if cfg.layer_tying.lora_rank:
    s["layer_lora"] = [_lora_specs(blocks.specs(cfg, kind), cfg.layer_tying.lora_rank,
                                   cfg.repeats) for kind in cfg.attention_pattern]


def _add_lora(block_params, lora):
  def add(path, w):
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    if key not in lora:
      return w
    delta = jnp.tensordot(lora[key]["a"], lora[key]["b"], axes=1)
    return w + delta.astype(w.dtype)
  return jax.tree_util.tree_map_with_path(add, block_params)


def _tied_group(layer_params, layer_lora, r, cfg: ModelConfig):
  """Block params of repetition ``r`` (traced or int) under layer tying."""
  sets = cfg.layer_tying.unique_layers // cfg.period
  pick = lambda a: jax.lax.dynamic_index_in_dim(a, r % sets, 0, keepdims=False)
  group = jax.tree.map(pick, layer_params)
  if layer_lora is not None:
    group = [_add_lora(g, l) for g, l in zip(group, layer_lora)]
  return group


# ----------------------------------------------------------------------------- remat


def _remat(fn, cfg: ModelConfig):
  policies = jax.checkpoint_policies
  if cfg.remat == "none":
    return fn
  policy = {
      "full": policies.nothing_saveable,
      "save_dots": policies.dots_with_no_batch_dims_saveable,
      "save_named": policies.save_only_these_names(*cfg.remat_save),
  }[cfg.remat]
  return jax.checkpoint(fn, policy=policy, prevent_cse=not cfg.scan_layers)


# ----------------------------------------------------------------------------- forward


def _check_tokens(tokens, cfg: ModelConfig, where: str):
  if tokens.ndim != 2:
    raise ValueError(f"{where}: tokens must have shape [batch, time], got {tokens.shape}")
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"{where}: tokens must be integers, got dtype {tokens.dtype}")


def _run_layers(layer_params, x, cfg: ModelConfig, ctx: Context, layer_caches, layer_states=None,
                collect=False, layer_lora=None, repeats=None, layer_offset=0):
  """Run the stacked layers over ``x`` (an array, or the pytree a topology's stream hooks carry).

  Returns ``(x, new_caches, new_states, per_layer)``: per-pattern stacked caches and norm states
  (None when not given) and, with ``collect``, every layer's output stacked ``[layers, ...]``
  (else None). ``repeats``/``layer_offset`` run fewer stacked groups starting at a later layer
  (the precomputed-first-layer variant); ``layer_lora`` holds per-layer LoRA deltas of tied
  layers."""
  pattern = cfg.attention_pattern
  period = len(pattern)
  repeats = cfg.repeats if repeats is None else repeats
  tied = cfg.layer_tying.unique_layers is not None

  def one_block(kind, p, x, layer_idx, cache, norm_state):
    extras = dict(ctx.extras)
    if norm_state is not None:
      extras["norm_state"], extras["norm_state_out"] = norm_state, {}
    y, c = blocks.apply(p, x, cfg, ctx.replace(layer_idx=layer_idx, extras=extras), kind, cache)
    new_state = None if norm_state is None else {**norm_state, **extras["norm_state_out"]}
    return y, c, new_state

  block_fns = [_remat(functools.partial(one_block, kind), cfg) for kind in pattern]

  def group(x, group_params, r, group_caches, group_states):
    new_c, new_s, outs = [], [], []
    for i in range(period):
      x, c, s = block_fns[i](group_params[i], x, layer_offset + r * period + i,
                             None if group_caches is None else group_caches[i],
                             None if group_states is None else group_states[i])
      new_c.append(c)
      new_s.append(s)
      outs.append(x)
    return x, ((None if group_caches is None else new_c),
               (None if group_states is None else new_s),
               jnp.stack(outs) if collect else None)

  if cfg.scan_layers:
    def body(x, xs):
      gp, r, gc, gs, gl = xs
      if tied:
        gp = _tied_group(layer_params, gl, r, cfg)
      return group(x, gp, r, gc, gs)

    x, (new_caches, new_states, per_layer) = jax.lax.scan(
        body, x, (None if tied else layer_params, jnp.arange(repeats, dtype=jnp.int32),
                  layer_caches, layer_states, layer_lora))
  else:
    results = []
    for r in range(repeats):
      pick = lambda tree: None if tree is None else jax.tree.map(lambda a: a[r], tree)  # noqa: B023
      gp = _tied_group(layer_params, pick(layer_lora), r, cfg) if tied else pick(layer_params)
      x, res = group(x, gp, r, pick(layer_caches), pick(layer_states))
      results.append(res)
    new_caches, new_states, per_layer = jax.tree.map(lambda *a: jnp.stack(a), *results)
  if collect:
    per_layer = per_layer.reshape(repeats * period, *per_layer.shape[2:])
  return x, new_caches, new_states, per_layer


def embed(params, tokens, cfg: ModelConfig, positions):
  """Token (+ learned position) embedding, times sqrt(d) with ``scale_embeddings`` and times the
  learned scalar ``embed.scale`` when present (DyT). The embedding norm is applied by the model."""
  x = jnp.take(params["embed"]["tokens"], tokens, axis=0)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
  if "positions" in params["embed"]:
    x = x + jnp.take(params["embed"]["positions"], positions, axis=0)
  if "scale" in params["embed"]:
    x = x * params["embed"]["scale"].astype(x.dtype)
  return sharding.constrain(x, ("batch", "seq", "embed"))


def _model_norm(norm_params, norm_state, x, norm_cfg, norm_ctx):
  """A model-level norm (embedding / final): ``(y, new_state)``, state None when stateless."""
  if not norm_cfg.is_stateful:
    return norms.apply(norm_params, x, norm_cfg), None
  return norms.apply_stateful(norm_params, norm_state, x, norm_cfg, norm_ctx)


def head(params, x, cfg: ModelConfig, *, norm_state=None, norm_ctx=None):
  """Final norm and output projection to float32 logits (float64 for float64 compute)."""
  return _head(params, x, cfg, norm_state, norm_ctx)[0]


def _head(params, x, cfg: ModelConfig, norm_state, norm_ctx):
  new_norm_state = None
  if cfg.final_norm:
    x, new_norm_state = _model_norm(params["final_norm"], norm_state, x, cfg.norm.final(),
                                    norm_ctx)
  acc = jnp.promote_types(x.dtype, jnp.float32)
  if cfg.tie_embeddings:
    logits = jnp.einsum("btd,vd->btv", x, params["embed"]["tokens"], preferred_element_type=acc)
  else:
    logits = jnp.einsum("btd,dv->btv", x, params["head"]["w"], preferred_element_type=acc)
    if "b" in params["head"]:
      logits = logits + params["head"]["b"].astype(acc)
  if cfg.logit_softcap is not None:
    logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
  return sharding.constrain(logits, ("batch", "seq", "vocab")), new_norm_state


def _forward(params, tokens, cfg: ModelConfig, positions, segment_ids, cache, training,
             return_hidden=False, state=None, step=None, collect=False):
  """Returns ``(out, new_cache, new_state, per_layer)``; ``out`` is the logits or, with
  ``return_hidden``, the final hidden states; ``per_layer`` ``[n_layers + 1, b, t, d]`` holds the
  embedding output and every layer's output when ``collect``."""
  params = P.cast_floating(params, cfg.compute_dtype)
  stateful = cfg.norm.is_stateful
  if stateful and not state:
    raise ValueError(f"model.norm.kind='{cfg.norm.kind}' keeps running statistics: pass the "
                     "model state (model.init_state(cfg), or the one saved by the trainer) as "
                     "state=")
  extras = {}
  norm_ctx = None
  if stateful:
    norm_ctx = norms.NormContext(training=training, step=state["step"] if step is None else step,
                                 mask=None if segment_ids is None else segment_ids != 0)
    extras["norm_context"] = norm_ctx
  new_state = dict(state) if stateful else state
  hooks = blocks.stream_hooks(cfg)
  top = params.get("topology", {})
  extras.update(top)
  ctx = Context(positions=positions, segment_ids=segment_ids, n_layers=cfg.n_layers,
                cache_index=None if cache is None else cache["index"], training=training,
                extras=extras)
  new_cache = None if cache is None else {"index": cache["index"] + tokens.shape[1]}
  run = dict(layer_lora=params.get("layer_lora"))
  if cfg.precomputed_first_layer:
    from jaxblocks.tricks import precompute_first_layer
    x, first_cache = precompute_first_layer.run_first_layer(
        params, tokens, cfg, ctx.replace(layer_idx=0),
        None if cache is None else cache["first_layer"])
    run.update(repeats=cfg.repeats - 1, layer_offset=1)
    if cache is not None:
      new_cache["first_layer"] = first_cache
  else:
    x = embed(params, tokens, cfg, positions)
  if cfg.block.embed_norm:
    x, s = _model_norm(params["embed_norm"], state.get("embed_norm") if stateful else None, x,
                       cfg.norm, norm_ctx)
    if stateful:
      new_state["embed_norm"] = s
  x_embedded = x
  if hooks is not None:
    x = hooks.init(top, x, cfg)
  x, new_layers, new_layer_states, per_layer = _run_layers(
      params["layers"], x, cfg, ctx, None if cache is None else cache["layers"],
      state["layers"] if stateful else None, collect, **run)
  if hooks is not None:
    x = hooks.readout(top, x, cfg)
  if stateful:
    new_state["layers"] = new_layer_states
  if return_hidden:
    out = x
  else:
    out, final_state = _head(params, x, cfg, state.get("final_norm") if stateful else None,
                             norm_ctx)
    if stateful and cfg.final_norm:
      new_state["final_norm"] = final_state
  if collect:
    per_layer = jnp.concatenate([x_embedded[None], per_layer], axis=0)
  if cache is not None:
    new_cache["layers"] = new_layers
  return out, new_cache, new_state, per_layer


def apply(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
          training: bool = False, return_hidden: bool = False, state=None):
  """Float32 logits ``[batch, time, vocab]`` for int tokens ``[batch, time]``.

  positions default to ``0..T-1``; ``segment_ids`` (packed documents) restrict attention to
  tokens of the same segment. ``return_hidden`` returns the final hidden states before the head.
  ``state`` (from :func:`init_state` / the trainer) is required by models with stateful norms
  (``repbn``, ``prepbn``), which then normalise with their running statistics.
  """
  positions = _check_inputs(tokens, cfg, positions, segment_ids, "model.apply")
  out, _, _, _ = _forward(params, tokens, cfg, positions, segment_ids, None, training,
                          return_hidden, state=state)
  return out


def hidden_states(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
                  state=None):
  """Every residual-stream state ``[n_layers + 1, batch, time, d]``: the embedding output
  (after the embedding norm, if any) followed by each layer's output (evaluation mode)."""
  positions = _check_inputs(tokens, cfg, positions, segment_ids, "model.hidden_states")
  if cfg.precomputed_first_layer:
    raise ValueError("model.hidden_states: a precomputed first layer has no separate embedding "
                     "output (model.precomputed_first_layer=True); use the original model")
  if blocks.stream_hooks(cfg) is not None:
    raise ValueError(f"model.hidden_states: topology '{cfg.block.topology}' carries no single "
                     "residual stream between layers")
  _, _, _, per_layer = _forward(params, tokens, cfg, positions, segment_ids, None, False,
                                return_hidden=True, state=state, collect=True)
  return per_layer


def _check_inputs(tokens, cfg: ModelConfig, positions, segment_ids, where):
  _check_tokens(tokens, cfg, where)
  b, t = tokens.shape
  if positions is None:
    if segment_ids is not None:
      positions = segment_positions(segment_ids)
    else:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  if positions.shape != tokens.shape:
    raise ValueError(f"{where}: positions shape {positions.shape} != tokens shape {tokens.shape}")
  if segment_ids is not None and segment_ids.shape != tokens.shape:
    raise ValueError(f"{where}: segment_ids shape {segment_ids.shape} != tokens shape "
                     f"{tokens.shape}")
  if cfg.position_embedding == "learned" and t > cfg.max_seq_len:
    raise ValueError(f"{where}: sequence length {t} exceeds model.max_seq_len={cfg.max_seq_len}"
                     " with learned position embeddings")
  return positions


def state_specs(cfg: ModelConfig):
  """Spec tree of the non-trainable state: for stateful norms (``repbn``, ``prepbn``) the running
  statistics of every norm (layers stacked like the params) and the last training ``step``
  (which drives the PRepBN schedule at evaluation); ``{}`` otherwise."""
  cfg.validate()
  if not cfg.norm.is_stateful:
    return {}
  d = cfg.d_model
  s = {"step": P.ParamSpec((), (), P.zeros, jnp.int32), "layers": []}
  for kind in cfg.attention_pattern:
    slots = blocks.norm_slots(blocks.specs(cfg, kind))
    s["layers"].append(P.stack({slot: norms.state_specs(d, cfg.norm) for slot in slots},
                               cfg.repeats))
  if cfg.block.embed_norm:
    s["embed_norm"] = norms.state_specs(d, cfg.norm)
  if cfg.final_norm:
    s["final_norm"] = norms.state_specs(d, cfg.norm.final())
  return s


def init_state(cfg: ModelConfig, mesh=None, rules=None):
  """Non-trainable model state (running normalisation statistics of RepBN/PRepBN), checkpointed
  with the parameters and threaded through :func:`apply_train`. Empty for models that keep none."""
  specs = state_specs(cfg)
  if mesh is None:  # constant initialisers: no randomness, no compilation needed
    return jax.tree.map(lambda s: s.init(jax.random.key(0), s.shape, s.dtype), specs,
                        is_leaf=P.is_spec)
  return P.init(specs, jax.random.key(0), mesh, rules)


def apply_train(params, state, tokens, cfg: ModelConfig, *, step, positions=None,
                segment_ids=None):
  """The training forward pass: ``(logits, new_state)``.

  ``step`` (int32 scalar) drives step-dependent schedules inside the model (the PRepBN LN → RepBN
  weight); ``state`` is the tree from :func:`init_state` and comes back updated (batch statistics
  folded into the running ones, padding — segment id 0 — left out; ``state['step'] = step``).
  Every trainer calls this function.
  """
  positions = _check_inputs(tokens, cfg, positions, segment_ids, "model.apply_train")
  if not cfg.norm.is_stateful:
    logits, _, _, _ = _forward(params, tokens, cfg, positions, segment_ids, None, True)
    return logits, state
  step = jnp.asarray(step, jnp.int32)
  logits, _, new_state, _ = _forward(params, tokens, cfg, positions, segment_ids, None, True,
                                     state=state, step=step)
  new_state["step"] = step
  return logits, new_state


def segment_positions(segment_ids):
  """Positions restarting at 0 at every segment boundary of ``segment_ids[batch, time]``."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  last_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - last_start


# ----------------------------------------------------------------------------- decoding


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
  """Decoding state for every layer (KV caches, recurrent states), stacked like the params."""
  dtype = cfg.compute_dtype if dtype is None else dtype
  stacked = cfg.repeats - 1 if cfg.precomputed_first_layer else cfg.repeats
  layers = []
  for kind in cfg.attention_pattern:
    one = attn_base.get(kind).init_cache(batch, max_len, cfg.d_model, cfg.attention, dtype)
    layers.append(jax.tree.map(lambda a: jnp.broadcast_to(a, (stacked, *a.shape)), one))
  cache = {"index": jnp.zeros((), jnp.int32), "layers": layers}
  if cfg.precomputed_first_layer:
    cache["first_layer"] = attn_base.get(cfg.attention_pattern[0]).init_cache(
        batch, max_len, cfg.d_model, cfg.attention, dtype)
  return cache


def apply_cached(params, tokens, cfg: ModelConfig, cache, state=None):
  """Process ``tokens`` at positions ``cache.index ...``; returns ``(logits, new_cache)``.
  ``state``: the model state, required by stateful norms (see :func:`apply`)."""
  _check_tokens(tokens, cfg, "model.apply_cached")
  b, t = tokens.shape
  positions = cache["index"] + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, new_cache, _, _ = _forward(params, tokens, cfg, positions, None, cache, training=False,
                                     state=state)
  return logits, new_cache


def sample_logits(logits_bv, key, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None):
  """Sample token ids from ``logits[batch, vocab]``; temperature 0 means greedy."""
  if temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits = logits_bv.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    cutoff_idx = jnp.sum(cum - probs < top_p, axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p"))
def _generate(params, prompt, key, cfg, max_new_tokens, temperature, top_k, top_p, state):
  b, t0 = prompt.shape
  cache = init_cache(cfg, b, t0 + max_new_tokens)
  logits, cache = apply_cached(params, prompt, cfg, cache, state)
  key, sub = jax.random.split(key)
  first = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)

  def step(carry, _):
    tok, cache, key = carry
    logits, cache = apply_cached(params, tok[:, None], cfg, cache, state)
    key, sub = jax.random.split(key)
    nxt = sample_logits(logits[:, -1], sub, temperature, top_k, top_p)
    return (nxt, cache, key), tok

  (last, _, _), toks = jax.lax.scan(step, (first, cache, key), None, length=max_new_tokens - 1)
  return jnp.concatenate([toks.T, last[:, None]], axis=1)


def generate(params, prompt, cfg: ModelConfig, key=None, max_new_tokens: int = 32,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             state=None):
  """Sample ``max_new_tokens`` continuation tokens of ``prompt[batch, time]``.

  Prefill runs the whole prompt once; each new token then costs one cached step (KV cache for
  softmax layers, recurrent state for linear-attention layers). Compiled once per shape and
  sampling setting. ``temperature=0`` is greedy decoding. ``state``: the model state, required
  by stateful norms (see :func:`apply`).
  """
  _check_tokens(prompt, cfg, "generate")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
  if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
    raise ValueError(f"generate: top_k must be in [1, vocab_size={cfg.vocab_size}], got {top_k}")
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
  total = prompt.shape[1] + max_new_tokens
  if cfg.position_embedding == "learned" and total > cfg.max_seq_len:
    raise ValueError(f"generate: prompt length + max_new_tokens = {total} exceeds "
                     f"model.max_seq_len={cfg.max_seq_len}")
  key = jax.random.key(0) if key is None else key
  return _generate(params, prompt, key, cfg, max_new_tokens, float(temperature), top_k, top_p,
                   state)
