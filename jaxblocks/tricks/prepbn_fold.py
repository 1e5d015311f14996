"""PRepBN / RepBN → inference (SLAB): fold the batch-norm affine into the next linears.

Once the PRepBN schedule has reached ``lambda = 0`` the norm is ``RepBN(x) = BN(x) + eta·x``, which
under the running statistics is the per-channel affine
``(gamma/sqrt(var + eps) + eta)·x + (beta − gamma·mean/sqrt(var + eps))``. :func:`fold_prepbn`
folds it into the projections reading each norm (and the final one into an untied head) and
returns a stateless model whose norms are ``none``.
"""

from __future__ import annotations

import jax

from jaxblocks import norms
from jaxblocks.config import ModelConfig
from jaxblocks.tricks import folding
from jaxblocks.tricks.folding import ConversionError


def fold_prepbn(params, state, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """``(params, state, cfg) -> (params, cfg)`` of the equivalent norm-free inference model.

  ``state`` is the model state (``model.init_state`` / as trained). Requires ``repbn`` or a
  ``prepbn`` whose schedule is over (``lambda(state['step']) == 0``), a ``pre``/``parallel``
  topology, no embedding norm and no dropout.
  """
  what = "fold_prepbn"
  cfg.validate()
  if cfg.norm.kind not in ("repbn", "prepbn") or cfg.norm.final().kind not in ("repbn", "prepbn"):
    raise ConversionError(f"{what}: needs model.norm.kind 'repbn' or 'prepbn', got "
                          f"'{cfg.norm.kind}'")
  if not state or "layers" not in state:
    raise ConversionError(f"{what}: the model state with the running statistics is required")
  for norm_cfg in (cfg.norm, cfg.norm.final()):
    if norm_cfg.kind == "prepbn":
      lam = float(norms.prepbn_lambda(state["step"], norm_cfg))
      if lam != 0.0:
        raise ConversionError(f"{what}: the PRepBN schedule is not finished at step "
                              f"{int(state['step'])} (LayerNorm weight lambda={lam:.3g}); the LN "
                              "part cannot be folded — train past prepbn_warmup_steps + "
                              "prepbn_decay_steps")
  folding.check_foldable(cfg, what)
  params, changes = folding.run_compiled(_fold_prepbn, params, state, cfg)
  return params, folding.apply_config_changes(cfg, changes)


def _fold_prepbn(params, state, cfg: ModelConfig):
  stacked_affine = jax.vmap(lambda p, s: norms.repbn_affine(p, s, cfg.norm))
  affines = []
  for lp, ls in zip(params["layers"], state["layers"]):
    affines.append({slot: stacked_affine(lp[slot], ls[slot]) for slot in folding.norm_readers(cfg)})
  params, changes = folding.fold_layer_norms(params, cfg, affines)
  params["layers"] = [{**lp, **{slot: {} for slot in folding.norm_readers(cfg)}}
                      for lp in params["layers"]]
  if cfg.final_norm:
    gain, bias = norms.repbn_affine(params["final_norm"], state["final_norm"], cfg.norm.final())
    params, head_changes = folding.fold_into_head(params, cfg, gain, bias)
    changes.update(head_changes)
    params["final_norm"] = {}
  changes["norm"] = norms.NormConfig(kind="none", scale=False)
  return params, changes
