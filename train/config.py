"""The trainer's configuration: one typed dataclass per subsystem, composed in :class:`Config`.

Configs are YAML files plus dotted command-line overrides, parsed by ``draccus`` into the frozen
dataclasses (which gives typed decoding, tuples and nested sections)::

    jaxblocks-train --config configs/tiny.yaml model.n_layers=4 --optim.lr=1e-3

Before anything is compiled, :func:`load` rejects unknown keys (with the closest valid name),
values of the wrong type and impossible combinations, always naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any, Mapping, Sequence

import draccus
import yaml

from jaxblocks.config import ModelConfig
from jaxblocks.errors import ConfigError, check_choice, check_int, check_positive

from train.checkpoint import CheckpointConfig
from train.data.config import DataConfig
from train.distributed import DistributedConfig
from train.mesh import MeshConfig
from train.optim import OptimConfig
from train.reporting import LoggingConfig

NONFINITE_ACTIONS = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The run itself.

  steps: optimizer steps in total; seed: parameter-init and sampling seed; workdir: where
    checkpoints, logs and the resolved config go (resuming happens there).
  eval_every / eval_batches: held-out evaluation period (0 disables) and size.
  sample_every: also print a generated sample every N steps (0: only at the end);
    sample_tokens / sample_prompt / sample_temperature / sample_top_k: the sampling settings.
  z_loss: weight of the ``logsumexp(logits)**2`` auxiliary loss (0 disables).
  on_nonfinite: ``stop`` (default) ends the run with an error at a NaN/Inf loss or gradient;
    ``skip`` drops that update and goes on (at most ``max_skipped_steps`` in a row).
  init_from: a Hugging Face model directory (config.json + safetensors) whose weights start the
    run instead of a random init (fine-tuning); ``model`` must describe the same architecture
    (``jaxblocks-convert import DIR`` prints that model section). Ignored when resuming.
  """

  steps: int = 1000
  seed: int = 0
  workdir: str = "runs/default"
  eval_every: int = 100
  eval_batches: int = 8
  sample_every: int = 0
  sample_tokens: int = 200
  sample_prompt: str = "\n"
  sample_temperature: float = 0.8
  sample_top_k: int | None = 40
  z_loss: float = 0.0
  on_nonfinite: str = "stop"
  max_skipped_steps: int = 10
  init_from: str | None = None

  def validate(self, prefix: str = "train") -> "RunConfig":
    check_int(f"{prefix}.steps", self.steps, minimum=1)
    check_int(f"{prefix}.seed", self.seed, minimum=0)
    if not isinstance(self.workdir, str) or not self.workdir:
      raise ConfigError(f"{prefix}.workdir", "must be a non-empty directory path")
    check_int(f"{prefix}.eval_every", self.eval_every, minimum=0)
    check_int(f"{prefix}.eval_batches", self.eval_batches, minimum=1)
    check_int(f"{prefix}.sample_every", self.sample_every, minimum=0)
    check_int(f"{prefix}.sample_tokens", self.sample_tokens, minimum=0)
    check_positive(f"{prefix}.sample_temperature", self.sample_temperature, allow_zero=True)
    if self.sample_top_k is not None:
      check_int(f"{prefix}.sample_top_k", self.sample_top_k, minimum=1)
    check_positive(f"{prefix}.z_loss", self.z_loss, allow_zero=True)
    check_choice(f"{prefix}.on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
    check_int(f"{prefix}.max_skipped_steps", self.max_skipped_steps, minimum=1)
    if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
      raise ConfigError(f"{prefix}.init_from", "must be a Hugging Face model directory or null")
    return self


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a training run needs."""

  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
  distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
  train: RunConfig = dataclasses.field(default_factory=RunConfig)

  def validate(self) -> "Config":
    """Every section's own checks, then the combinations that cannot work."""
    self.model.validate()
    for name in ("data", "optim", "checkpoint", "mesh", "logging", "distributed", "train"):
      getattr(self, name).validate(name)
    if self.data.seq_len > self.model.max_seq_len:
      raise ConfigError("data.seq_len", f"{self.data.seq_len} exceeds model.max_seq_len="
                        f"{self.model.max_seq_len}")
    if self.data.tokenizer == "byte" and self.model.vocab_size < 256:
      raise ConfigError("model.vocab_size", f"{self.model.vocab_size} is smaller than the 256 "
                        "ids of the byte tokenizer")
    accum = self.optim.grad_accum_steps
    if self.data.global_batch_size % accum:
      raise ConfigError("optim.grad_accum_steps", f"{accum} does not divide "
                        f"data.global_batch_size={self.data.global_batch_size}")
    if self.optim.warmup_steps >= self.train.steps and self.optim.schedule != "constant":
      raise ConfigError("optim.warmup_steps", f"{self.optim.warmup_steps} must be smaller than "
                        f"train.steps={self.train.steps}")
    if self.train.sample_top_k is not None and self.train.sample_top_k > self.model.vocab_size:
      raise ConfigError("train.sample_top_k", f"{self.train.sample_top_k} exceeds "
                        f"model.vocab_size={self.model.vocab_size}")
    if (self.model.position_embedding == "learned"
        and self.train.sample_tokens + len(self.train.sample_prompt.encode()) > self.model.max_seq_len):
      raise ConfigError("train.sample_tokens", "prompt plus sample_tokens exceed "
                        f"model.max_seq_len={self.model.max_seq_len} (learned positions)")
    return self

  def to_dict(self) -> dict[str, Any]:
    """Plain nested dict (tuples as lists); ``model`` is in ``ModelConfig.from_dict`` format."""
    out = {}
    for f in dataclasses.fields(self):
      sub = getattr(self, f.name)
      out[f.name] = sub.to_dict() if f.name == "model" else _plain(dataclasses.asdict(sub))
    return out


def _plain(x):
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


# ----------------------------------------------------------------------------- key checking


def _fields(cls) -> dict[str, Any]:
  hints = typing.get_type_hints(cls)
  return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_key(path: Sequence[str], cls=Config) -> None:
  """Raise ``ConfigError`` naming ``path`` when it is not a key of the config tree."""
  for i, part in enumerate(path):
    fields = _fields(cls)
    if part not in fields:
      key = ".".join(path[:i + 1])
      close = difflib.get_close_matches(part, list(fields), n=1)
      hint = f"; did you mean '{'.'.join([*path[:i], close[0]])}'?" if close else ""
      raise ConfigError(key, f"unknown key{hint} valid keys here are {sorted(fields)}")
    cls = fields[part]
    if not dataclasses.is_dataclass(cls):
      if i != len(path) - 1:
        raise ConfigError(".".join(path[:i + 2]), f"'{'.'.join(path[:i + 1])}' is a value, "
                          "not a section")
      return


def _check_mapping(d: Mapping, cls=Config, prefix: tuple[str, ...] = ()) -> None:
  if not isinstance(d, Mapping):
    raise ConfigError(".".join(prefix) or "<config>", f"expected a mapping of keys, got "
                      f"{type(d).__name__}")
  for k, v in d.items():
    path = (*prefix, str(k))
    _check_key(path)
    sub = _fields(cls)[k]
    if dataclasses.is_dataclass(sub):
      if v is None:
        continue
      _check_mapping(v, sub, path)


def _normalise_overrides(args: Sequence[str]) -> list[str]:
  """``a.b=1`` / ``--a.b=1`` / ``--a.b 1`` → ``--a.b=1`` after checking each key."""
  out, i = [], 0
  args = list(args)
  while i < len(args):
    arg = args[i]
    body = arg[2:] if arg.startswith("--") else arg
    if "=" in body:
      key, value = body.split("=", 1)
    elif arg.startswith("--") and i + 1 < len(args):
      key, value = body, args[i + 1]
      i += 1
    else:
      raise ConfigError(body, "override needs a value: write key=value")
    _check_key(key.split("."))
    out.append(f"--{key}={value}")
    i += 1
  return out


def load(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
  """Read a YAML config (or the defaults), apply dotted overrides, validate everything."""
  data: Mapping = {}
  if path:
    if not os.path.isfile(path):
      raise ConfigError("--config", f"config file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
      try:
        data = yaml.safe_load(f) or {}
      except yaml.YAMLError as e:
        raise ConfigError("--config", f"{path} is not valid YAML: {e}") from None
    _check_mapping(data)
  args = _normalise_overrides(overrides)
  try:
    cfg = draccus.parse(Config, config_path=path or None, args=args)
  except draccus.utils.DecodingError as e:
    key = ".".join(str(k) for k in e.key_path) if getattr(e, "key_path", None) else "<config>"
    message = str(e).split(": ", 1)[-1]
    raise ConfigError(key, f"wrong type: {message}") from None
  return cfg.validate()


def dump(cfg: Config, path: str) -> None:
  """Write the resolved config as YAML (loadable with :func:`load`)."""
  with open(path, "w", encoding="utf-8") as f:
    yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
