"""Error types and validation helpers shared by every config and public function."""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the key and what is allowed."""

  def __init__(self, key: str, message: str):
    self.key = key
    super().__init__(f"config key '{key}': {message}")


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(key, f"got {value!r}; allowed values are {allowed}")


def check_positive(key: str, value: Any, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    raise ConfigError(key, f"must be a {'non-negative' if allow_zero else 'positive'} number, "
                      f"got {value!r}")


def check_int(key: str, value: Any, minimum: int | None = None) -> None:
  if not isinstance(value, int) or isinstance(value, bool):
    raise ConfigError(key, f"must be an integer, got {value!r} ({type(value).__name__})")
  if minimum is not None and value < minimum:
    raise ConfigError(key, f"must be >= {minimum}, got {value}")


def check_rank(name: str, x, rank: int, what: str) -> None:
  """Trace-time shape check for public functions."""
  if getattr(x, "ndim", None) != rank:
    raise ValueError(f"{name}: expected {what} (rank {rank}), got shape {getattr(x, 'shape', None)}")
