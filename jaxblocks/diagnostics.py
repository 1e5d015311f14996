"""Depth diagnostics: how the residual stream evolves through the layers ("curse of depth").

For every depth ``l`` (0 = embedding output, ``l`` = output of layer ``l``) :func:`depth_profile`
reports the hidden-state RMS, the per-token variance over the model axis, and the angular
distance ``arccos(cos(h_{l-1}, h_l)) / pi`` between consecutive outputs (0: the layer changed
nothing in direction; deep Pre-LN layers drift towards 0, i.e. they barely contribute).

The CLI ``jaxblocks-diagnose`` loads models from trainer work dirs (``<workdir>/config.yaml`` and
the latest Orbax checkpoint under ``<workdir>/checkpoints``) or bare ``config.yaml`` files (random
init), prints a table per model and saves one PNG comparing them (matplotlib, the ``diagnose``
extra)::

    jaxblocks-diagnose runs/pre runs/peri runs/mix --out depth.png --json depth.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from jaxblocks import model
from jaxblocks import params as P
from jaxblocks.config import ModelConfig

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor "
                "jugs! How vexingly quick daft zebras jump; sphinx of black quartz, judge my vow.")


def depth_profile(params, tokens, cfg: ModelConfig, *, state=None, segment_ids=None
                  ) -> dict[str, list[float]]:
  """Per-depth statistics of the residual stream for ``tokens[batch, time]`` (evaluation mode).

  Returns ``{"depth": [0..L], "rms": [...], "variance": [...], "angular_distance": [...]}``;
  ``angular_distance[l]`` compares depth ``l`` with ``l - 1`` (entry 0 is None). Tokens with
  ``segment_ids == 0`` (padding) are left out of the averages.
  """
  hidden = _hidden_jit(params, tokens, cfg, segment_ids, state)
  stats = _stats_jit(hidden, None if segment_ids is None else segment_ids != 0)
  rms, var, ang = (np.asarray(s, np.float64) for s in stats)
  return {"depth": list(range(cfg.n_layers + 1)), "rms": rms.tolist(), "variance": var.tolist(),
          "angular_distance": [None] + ang.tolist()}


def _hidden(params, tokens, cfg, segment_ids, state):
  return model.hidden_states(params, tokens, cfg, segment_ids=segment_ids, state=state)


_hidden_jit = jax.jit(_hidden, static_argnames=("cfg",))


@jax.jit
def _stats_jit(hidden_lbtd, mask_bt):
  h = hidden_lbtd.astype(jnp.promote_types(hidden_lbtd.dtype, jnp.float32))
  w = jnp.ones(h.shape[1:3], h.dtype) if mask_bt is None else mask_bt.astype(h.dtype)
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean_tokens = lambda v: jnp.sum(v * w, axis=(-2, -1)) / n  # noqa: E731
  rms = mean_tokens(jnp.sqrt(jnp.mean(jnp.square(h), axis=-1)))
  var = mean_tokens(jnp.var(h, axis=-1))
  a, b = h[:-1], h[1:]
  cos = jnp.sum(a * b, -1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1),
                                         1e-30)
  ang = mean_tokens(jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / jnp.pi)
  return rms, var, ang


def text_tokens(text: str, cfg: ModelConfig) -> jax.Array:
  """Byte-level tokens of ``text`` (UTF-8 bytes modulo the vocabulary), ``[1, time]``, cut to
  ``max_seq_len``."""
  data = list(text.encode("utf-8"))[: cfg.max_seq_len]
  if not data:
    raise ValueError("diagnose: the input text is empty")
  return jnp.asarray([[b % cfg.vocab_size for b in data]], jnp.int32)


# ----------------------------------------------------------------------------- loading


def load_config(path: str) -> ModelConfig:
  """The ``model:`` section of a trainer YAML (or a bare ModelConfig mapping)."""
  with open(path) as f:
    raw = yaml.safe_load(f)
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: expected a YAML mapping, got {type(raw).__name__}")
  section = raw["model"] if "model" in raw else raw
  return ModelConfig.from_dict(section).validate()


def _checkpoint_dir(path: str) -> tuple[str, str | None]:
  """``(config.yaml path, checkpoints dir or None)`` for a work dir, its checkpoints dir or a
  config file."""
  if os.path.isfile(path):
    return path, None
  if not os.path.isdir(path):
    raise FileNotFoundError(f"diagnose: {path} is neither a config file nor a directory")
  if os.path.basename(os.path.normpath(path)) == "checkpoints":
    workdir = os.path.dirname(os.path.normpath(path))
    return os.path.join(workdir, "config.yaml"), path
  cfg_path = os.path.join(path, "config.yaml")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"diagnose: {path} has no config.yaml (expected a trainer work dir)")
  ckpt = os.path.join(path, "checkpoints")
  return cfg_path, ckpt if os.path.isdir(ckpt) else None


def load_model(path: str, seed: int = 0) -> tuple[dict, Any, ModelConfig, str]:
  """``(params, state, cfg, description)`` from a work dir (latest checkpoint) or a config file
  (random init with ``seed``)."""
  cfg_path, ckpt_dir = _checkpoint_dir(path)
  cfg = load_config(cfg_path)
  if ckpt_dir is None:
    return model.init(cfg, jax.random.key(seed)), model.init_state(cfg), cfg, "random init"
  import orbax.checkpoint as ocp  # only needed for checkpoints

  with ocp.CheckpointManager(os.path.abspath(ckpt_dir)) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"diagnose: no checkpoint under {ckpt_dir}")
    items = {"params": ocp.args.StandardRestore(P.abstract(model.specs(cfg)))}
    state_specs = model.state_specs(cfg)
    if state_specs:
      items["model_state"] = ocp.args.StandardRestore(P.abstract(state_specs))
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
  state = restored["model_state"] if state_specs else model.init_state(cfg)
  return restored["params"], state, cfg, f"checkpoint step {step}"


# ----------------------------------------------------------------------------- report / plot


def format_table(name: str, profile: dict[str, list[float]]) -> str:
  lines = [f"== {name}", f"{'depth':>5} {'rms':>10} {'variance':>12} {'angular':>9}"]
  for l, r, v, a in zip(profile["depth"], profile["rms"], profile["variance"],
                        profile["angular_distance"]):
    ang = "" if a is None else f"{a:9.4f}"
    lines.append(f"{l:>5} {r:10.4g} {v:12.4g} {ang:>9}")
  return "\n".join(lines)


def plot_profiles(profiles: dict[str, dict[str, list[float]]], out_path: str) -> None:
  """One PNG, three panels (RMS and variance on log scales, angular distance), a line per model."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError as e:
    raise ImportError("diagnose: plotting needs matplotlib; install jaxblocks[diagnose]") from e
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for name, prof in profiles.items():
    axes[0].plot(prof["depth"], prof["rms"], marker="o", ms=3, label=name)
    axes[1].plot(prof["depth"], prof["variance"], marker="o", ms=3, label=name)
    axes[2].plot(prof["depth"][1:], prof["angular_distance"][1:], marker="o", ms=3, label=name)
  for ax, title in zip(axes, ("hidden-state RMS", "hidden-state variance",
                              "angular distance to previous layer")):
    ax.set_title(title)
    ax.set_xlabel("depth (0 = embedding)")
    ax.grid(alpha=0.3)
  axes[0].set_yscale("log")
  axes[1].set_yscale("log")
  axes[2].set_ylim(bottom=0)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="jaxblocks-diagnose",
      description="Per-layer hidden-state RMS / variance and angular distance between consecutive "
                  "layers, for trainer work dirs (latest checkpoint) or config.yaml files (random "
                  "init); one PNG compares them all.")
  parser.add_argument("paths", nargs="+", help="work dirs, their checkpoints/ dirs, or config.yaml")
  parser.add_argument("--label", action="append", default=None,
                      help="legend name per path (default: the path)")
  parser.add_argument("--text", default=DEFAULT_TEXT, help="input text (byte-level tokens)")
  parser.add_argument("--seed", type=int, default=0, help="init seed for config files")
  parser.add_argument("--out", default="depth_profile.png", help="PNG path ('' to skip)")
  parser.add_argument("--json", default=None, help="also write the numbers as JSON here")
  args = parser.parse_args(argv)
  if args.label is not None and len(args.label) != len(args.paths):
    parser.error(f"--label given {len(args.label)} times for {len(args.paths)} paths")
  labels = args.label or [os.path.normpath(p) for p in args.paths]
  profiles = {}
  for label, path in zip(labels, args.paths):
    try:
      params, state, cfg, origin = load_model(path, args.seed)
    except (FileNotFoundError, ValueError) as e:
      print(f"jaxblocks-diagnose: {e}", file=sys.stderr)
      return 2
    prof = depth_profile(params, text_tokens(args.text, cfg), cfg, state=state or None)
    profiles[label] = prof
    print(format_table(f"{label} ({cfg.block.topology}/{cfg.norm.kind}, {origin})", prof))
  if args.out:
    plot_profiles(profiles, args.out)
    print(f"wrote {args.out}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(profiles, f, indent=1)
    print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
