"""``LoggingConfig`` and the metric sinks: console progress, JSONL, TensorBoard event files
(written with tensorboardX, no TensorFlow needed). Only process 0 writes anything."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax

from jaxblocks.errors import check_int


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
  """How often to report (``every_steps``), whether to write TensorBoard events and the JSONL
  log (``<workdir>/metrics.jsonl``), and the console progress bar width."""

  every_steps: int = 10
  tensorboard: bool = True
  jsonl: bool = True
  bar_width: int = 20

  def validate(self, prefix: str = "logging") -> "LoggingConfig":
    check_int(f"{prefix}.every_steps", self.every_steps, minimum=1)
    check_int(f"{prefix}.bar_width", self.bar_width, minimum=0)
    return self


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _number(x: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.1f}{unit}"
  return f"{x:.0f}"


class Reporter:
  """Writes metrics to the console, the JSONL log and TensorBoard (process 0 only)."""

  def __init__(self, cfg: LoggingConfig, workdir: str, total_steps: int, stream=None):
    self.cfg, self.total_steps = cfg, total_steps
    self.enabled = jax.process_index() == 0
    self.stream = stream or sys.stdout
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if cfg.jsonl:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if cfg.tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=10)

  def print(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.stream, flush=True)

  def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
    """Record ``metrics`` at ``step`` in the JSONL log and TensorBoard."""
    if not self.enabled:
      return
    if self._jsonl:
      row = {"step": step, "split": prefix, "time": time.time()}
      row.update({k: (None if v is None else float(v)) for k, v in metrics.items()})
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    if self._tb:
      for k, v in metrics.items():
        if v is not None:
          self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

  def progress(self, step: int, metrics: dict[str, float], elapsed: float, steps_done: int) -> None:
    """One console line: bar, step, loss, tokens/s, MFU, ETA."""
    if not self.enabled:
      return
    frac = step / max(self.total_steps, 1)
    w = self.cfg.bar_width
    bar = f"[{'#' * int(frac * w)}{'.' * (w - int(frac * w))}] " if w else ""
    eta = elapsed / max(steps_done, 1) * (self.total_steps - step)
    mfu = metrics.get("mfu")
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
    self.print(f"{bar}step {step}/{self.total_steps} | loss {metrics['loss']:.4f} | "
               f"ppl {metrics['ppl']:.2f} | gnorm {metrics['grad_norm']:.3f} | "
               f"lr {metrics['lr']:.2e} | {_number(metrics['tokens_per_s'])} tok/s | "
               f"mfu {mfu_text} | ETA {_duration(eta)}")

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled and self._tb:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
