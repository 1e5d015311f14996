"""Depth diagnostics: the statistics, the loaders (config file, trainer work dir with an Orbax
checkpoint) and the CLI with its PNG."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml

from jaxblocks import diagnostics, model
from jaxblocks.blocks import BlockConfig
from jaxblocks.config import ModelConfig
from jaxblocks.norms import NormConfig
from tests.norms.model_factory import random_params

CFG = ModelConfig(vocab_size=64, d_model=16, n_layers=2, max_seq_len=32,
                  norm=NormConfig(kind="rmsnorm"), block=BlockConfig(topology="pre"))


def test_profile_matches_numpy():
  params = random_params(CFG, 0)
  tokens = diagnostics.text_tokens("hello depth", CFG)
  prof = diagnostics.depth_profile(params, tokens, CFG)
  h = np.asarray(model.hidden_states(params, tokens, CFG), np.float64)
  assert prof["depth"] == [0, 1, 2] and prof["angular_distance"][0] is None
  np.testing.assert_allclose(prof["rms"], np.sqrt((h ** 2).mean(-1)).mean((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(prof["variance"], h.var(-1).mean((1, 2)), rtol=1e-4)
  cos = (h[1:] * h[:-1]).sum(-1) / (np.linalg.norm(h[1:], axis=-1) * np.linalg.norm(h[:-1], axis=-1))
  np.testing.assert_allclose(prof["angular_distance"][1:],
                             (np.arccos(np.clip(cos, -1, 1)) / np.pi).mean((1, 2)), atol=1e-5)


def test_padding_is_left_out():
  params = random_params(CFG, 1)
  tokens = jnp.asarray([[5, 6, 7, 8, 9, 10]])
  seg = jnp.asarray([[1, 1, 1, 1, 0, 0]])
  a = diagnostics.depth_profile(params, tokens, CFG, segment_ids=seg)
  b = diagnostics.depth_profile(params, tokens.at[0, 4:].set(60), CFG, segment_ids=seg)
  np.testing.assert_allclose(a["rms"], b["rms"], rtol=1e-6)


def _write_config(path, cfg):
  with open(path, "w") as f:
    yaml.safe_dump({"model": cfg.to_dict(), "train": {"steps": 1}}, f)


def test_cli_config_and_workdir(tmp_path, capsys):
  cfg_path = tmp_path / "peri.yaml"
  _write_config(cfg_path, CFG.replace(block=BlockConfig(topology="peri")))
  workdir = tmp_path / "run"
  os.makedirs(workdir)
  _write_config(workdir / "config.yaml", CFG)
  params = random_params(CFG, 3)
  with ocp.CheckpointManager(str(workdir / "checkpoints")) as mngr:
    for step in (1, 5):
      mngr.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(jax.tree.map(lambda x: x * step, params)),
          model_state=ocp.args.JsonSave({})))
    mngr.wait_until_finished()
  out_png, out_json = tmp_path / "depth.png", tmp_path / "depth.json"
  rc = diagnostics.main([str(cfg_path), str(workdir), "--label", "peri", "--label", "trained",
                         "--out", str(out_png), "--json", str(out_json)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "checkpoint step 5" in text and "random init" in text
  assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  data = json.loads(out_json.read_text())
  assert set(data) == {"peri", "trained"} and len(data["trained"]["rms"]) == 3
  # The restored step-5 params are the saved ones.
  want = diagnostics.depth_profile(jax.tree.map(lambda x: x * 5, params),
                                   diagnostics.text_tokens(diagnostics.DEFAULT_TEXT, CFG), CFG)
  np.testing.assert_allclose(data["trained"]["rms"], want["rms"], rtol=1e-5)


def test_cli_errors(tmp_path, capsys):
  assert diagnostics.main([str(tmp_path / "missing"), "--out", ""]) == 2
  assert "neither a config file nor a directory" in capsys.readouterr().err
  os.makedirs(tmp_path / "empty")
  assert diagnostics.main([str(tmp_path / "empty"), "--out", ""]) == 2
  bad = tmp_path / "bad.yaml"
  bad.write_text("model:\n  d_modle: 3\n")
  assert diagnostics.main([str(bad), "--out", ""]) == 2
  assert "d_modle" in capsys.readouterr().err
  with pytest.raises(ValueError, match="empty"):
    diagnostics.text_tokens("", CFG)
