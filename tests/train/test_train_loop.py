"""End-to-end in one process: the tiny config learns; outputs land in the work dir; NaN stops."""

import json

import numpy as np
import pytest
import yaml

from jaxblocks import ModelConfig
from train import config, loop

from tests.train.trainer_helpers import TINY


def test_tiny_training_lowers_loss_and_writes_outputs(tmp_path, capsys):
  cfg = config.load(None, [*TINY, "train.steps=30", "optim.lr=1e-2", "optim.warmup_steps=3",
                           "logging.every_steps=5", "logging.tensorboard=true",
                           "train.eval_every=15", "train.eval_batches=2",
                           "train.sample_tokens=20", "checkpoint.every_steps=15",
                           f"train.workdir={tmp_path}"])
  summary = loop.run(cfg)
  assert summary["last_loss"] < summary["first_loss"] - 1.0
  assert summary["eval_loss"] < 4.5
  out = capsys.readouterr().out
  assert "step 30/30" in out and "tok/s" in out and "ETA" in out and "--- sample" in out
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {"loss", "ppl", "grad_norm", "lr", "tokens_per_s", "mfu"} <= set(rows[0])
  assert any(r["split"] == "eval" for r in rows)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
  assert ModelConfig.from_dict(resolved["model"]) == cfg.model
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [15, 30]


def test_nonfinite_loss_stops_without_checkpointing_bad_params(tmp_path):
  cfg = config.load(None, [*TINY, "train.steps=20", "optim.lr=1e30", "optim.schedule=constant",
                           "optim.warmup_steps=0", "optim.clip_norm=null",
                           "checkpoint.every_steps=1", f"train.workdir={tmp_path}"])
  with pytest.raises(loop.NonFiniteError, match="NaN/Inf"):
    loop.run(cfg)
  from tests.train.trainer_helpers import final_params
  _, params = final_params(tmp_path)
  assert all(np.isfinite(v).all() for v in params.values())
