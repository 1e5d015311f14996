"""``OptimConfig`` and the optax optimizer it describes: AdamW / Lion / Muon, warmup + cosine /
linear / WSD schedules, global-norm clipping and a weight-decay mask built from the parameter
specs (norm scales, biases and embeddings excluded unless configured)."""

from __future__ import annotations

import dataclasses

import jax
import optax

from jaxblocks import params as P
from jaxblocks.errors import ConfigError, check_choice, check_int, check_positive

OPTIMIZERS = ("adamw", "lion", "muon")
SCHEDULES = ("constant", "cosine", "linear", "wsd")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """The optimizer and its learning-rate schedule.

  name: ``adamw`` | ``lion`` | ``muon`` (optax.contrib.muon; matrices of the layer stack are
    orthogonalised, the other parameters get AdamW).
  lr: peak learning rate; schedule: ``constant`` | ``cosine`` | ``linear`` | ``wsd``
    (warmup-stable-decay: constant after warmup, linear decay over the last
    ``decay_fraction`` of training). All schedules warm up linearly over ``warmup_steps`` and end
    at ``lr * min_lr_ratio``.
  weight_decay: decoupled weight decay; ``decay_norms`` / ``decay_biases`` /
    ``decay_embeddings`` include those parameters in it.
  clip_norm: global gradient-norm clipping threshold (``null`` disables).
  grad_accum_steps: micro-batches per step (the global batch is split and scanned over).
  """

  name: str = "adamw"
  lr: float = 3e-4
  schedule: str = "cosine"
  warmup_steps: int = 100
  decay_fraction: float = 0.2
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_norms: bool = False
  decay_biases: bool = False
  decay_embeddings: bool = False
  clip_norm: float | None = 1.0
  grad_accum_steps: int = 1

  def validate(self, prefix: str = "optim") -> "OptimConfig":
    check_choice(f"{prefix}.name", self.name, OPTIMIZERS)
    check_choice(f"{prefix}.schedule", self.schedule, SCHEDULES)
    check_positive(f"{prefix}.lr", self.lr)
    check_int(f"{prefix}.warmup_steps", self.warmup_steps, minimum=0)
    check_int(f"{prefix}.grad_accum_steps", self.grad_accum_steps, minimum=1)
    check_positive(f"{prefix}.weight_decay", self.weight_decay, allow_zero=True)
    check_positive(f"{prefix}.eps", self.eps, allow_zero=True)
    for key in ("b1", "b2"):
      v = getattr(self, key)
      if not (isinstance(v, (int, float)) and 0.0 <= v < 1.0):
        raise ConfigError(f"{prefix}.{key}", f"must be in [0, 1), got {v!r}")
    if not 0.0 <= self.min_lr_ratio <= 1.0:
      raise ConfigError(f"{prefix}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
    if not 0.0 < self.decay_fraction <= 1.0:
      raise ConfigError(f"{prefix}.decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
    if self.clip_norm is not None:
      check_positive(f"{prefix}.clip_norm", self.clip_norm)
    return self


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step."""
  if cfg.warmup_steps >= total_steps and cfg.schedule != "constant":
    raise ConfigError("optim.warmup_steps", f"{cfg.warmup_steps} must be smaller than "
                      f"train.steps={total_steps}")
  peak, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
  warm = max(cfg.warmup_steps, 0)
  warmup = optax.linear_schedule(0.0 if warm else peak, peak, max(warm, 1))
  rest = total_steps - warm
  if cfg.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=cfg.min_lr_ratio)
  elif cfg.schedule == "linear":
    main = optax.linear_schedule(peak, end, rest)
  else:
    decay = max(1, int(round(cfg.decay_fraction * total_steps)))
    stable = max(rest - decay, 0)
    main = optax.join_schedules([optax.constant_schedule(peak),
                                 optax.linear_schedule(peak, end, decay)], [stable])
  if not warm:
    return main
  return optax.join_schedules([warmup, main], [warm])


def _kind(path: str, spec: P.ParamSpec) -> str:
  """``embedding`` | ``norm`` | ``bias`` | ``matrix`` for the weight-decay mask."""
  leaf = path.split("/")[-1]
  core_rank = sum(a != "layers" for a in spec.logical_axes)
  if path.startswith("embed/"):
    return "embedding"
  if "norm" in path:
    return "norm"
  if core_rank <= 1 or leaf.startswith("b"):
    return "bias"
  return "matrix"


def decay_mask(specs, cfg: OptimConfig):
  """Boolean tree: which parameters receive weight decay."""
  include = {"matrix": True, "norm": cfg.decay_norms, "bias": cfg.decay_biases,
             "embedding": cfg.decay_embeddings}
  flat = P.flatten_dict(specs)
  treedef = jax.tree.structure(specs, is_leaf=P.is_spec)
  return jax.tree.unflatten(treedef, [include[_kind(p, s)] for p, s in flat.items()])


def _muon_dims(specs):
  """Muon reshapes each layer-stack matrix to (inputs, outputs); others use AdamW (None)."""
  from optax.contrib import MuonDimensionNumbers

  def dims(path, spec):
    if _kind(path, spec) != "matrix" or path.startswith("embed/") or path.startswith("head/"):
      return None
    axes = list(spec.logical_axes)
    body = [i for i, a in enumerate(axes) if a != "layers"]
    if axes[body[0]] == "embed":    # x @ W: contract the embedding, output the rest
      return MuonDimensionNumbers(reduction_axis=(body[0],), output_axis=tuple(body[1:]))
    return MuonDimensionNumbers(reduction_axis=tuple(body[:-1]), output_axis=(body[-1],))

  flat = P.flatten_dict(specs)
  treedef = jax.tree.structure(specs, is_leaf=P.is_spec)
  return jax.tree.unflatten(treedef, [dims(p, s) for p, s in flat.items()])


def make(cfg: OptimConfig, specs, total_steps: int) -> tuple[optax.GradientTransformation,
                                                              optax.Schedule]:
  """The optax transformation (clipping included) and its schedule."""
  lr = schedule(cfg, total_steps)
  mask = decay_mask(specs, cfg)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=mask)
  elif cfg.name == "lion":
    opt = optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
  else:
    from optax import contrib
    opt = contrib.muon(lr, beta=cfg.b1 if cfg.b1 else 0.95, eps=cfg.eps,
                       weight_decay=cfg.weight_decay, weight_decay_mask=mask,
                       adam_b1=cfg.b1, adam_b2=cfg.b2,
                       # The AdamW half holds embeddings, norms and biases.
                       adam_weight_decay=cfg.weight_decay if cfg.decay_embeddings else 0.0,
                       muon_weight_dimension_numbers=_muon_dims(specs))
  if cfg.clip_norm is not None:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt, lr
