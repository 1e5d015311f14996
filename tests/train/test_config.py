"""Config loading: overrides, YAML round trip, and a table of bad configs with clear errors."""

import pytest
import yaml

from jaxblocks.errors import ConfigError
from train import cli, config, distributed


def test_overrides_and_yaml(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("model: {d_model: 64, attention: {n_heads: 2}}\noptim: {lr: 0.01}\n"
                  "train: {steps: 500}\n")
  cfg = config.load(str(path), ["model.n_layers=2", "--optim.lr", "0.02",
                                "model.attention_pattern=[softmax,softmax]"])
  assert cfg.model.d_model == 64 and cfg.model.n_layers == 2 and cfg.optim.lr == 0.02
  assert cfg.model.attention_pattern == ("softmax", "softmax")
  out = tmp_path / "resolved.yaml"
  config.dump(cfg, str(out))
  assert config.load(str(out)) == cfg
  assert set(yaml.safe_load(out.read_text())["model"]) >= {"d_model", "attention", "norm"}


def test_shipped_configs_load():
  import glob
  files = sorted(glob.glob("configs/*.yaml"))
  assert "configs/tiny.yaml" in files and len(files) >= 5
  for f in files:
    config.load(f)


BAD = [
    (["model.n_layerz=2"], "model.n_layerz", "did you mean 'model.n_layers'"),
    (["optimizer.lr=1"], "optimizer", "unknown key"),
    (["optim.lr=abc"], "optim.lr", "wrong type"),
    (["data.seq_len=1.5"], "data.seq_len", "wrong type"),
    (["optim.name=adagrad"], "optim.name", "allowed values"),
    (["model.attention.n_heads=3"], "model.attention.n_heads", "must divide d_model"),
    (["data.seq_len=4096"], "data.seq_len", "exceeds model.max_seq_len"),
    (["model.vocab_size=100"], "model.vocab_size", "byte tokenizer"),
    (["optim.grad_accum_steps=3"], "optim.grad_accum_steps", "does not divide"),
    (["train.steps=50"], "optim.warmup_steps", "must be smaller than train.steps"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "mesh.fsdp", "only one mesh axis may be -1"),
    (["mesh.rules=zero3"], "mesh.rules", "allowed values"),
    (["data.tokenizer=sentencepiece"], "data.tokenizer_path", "needs the path"),
    (["data.eval_fraction=1.5"], "data.eval_fraction", "[0, 1)"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last", ">= 1"),
    (["train.on_nonfinite=ignore"], "train.on_nonfinite", "allowed values"),
    (["distributed.num_processes=2"], "distributed.coordinator_address", "together"),
    (["model.d_model.x=1"], "model.d_model.x", "not a section"),
    (["model.n_layers"], "model.n_layers", "key=value"),
]


@pytest.mark.parametrize("overrides,key,message", BAD, ids=[b[1] for b in BAD])
def test_bad_config(overrides, key, message):
  with pytest.raises(ConfigError) as e:
    config.load(None, overrides)
  assert e.value.key == key
  assert message in str(e.value)


def test_bad_yaml_key_and_missing_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("data: {seq_lenn: 3}\n")
  with pytest.raises(ConfigError, match="data.seq_lenn"):
    config.load(str(path))
  path.write_text("model: 3\n")
  with pytest.raises(ConfigError, match="'model'"):
    config.load(str(path))
  with pytest.raises(ConfigError, match="not found"):
    config.load(str(tmp_path / "missing.yaml"))


def test_cli_reports_config_errors(capsys):
  assert cli.main(["optim.lr=fast"]) == 2
  err = capsys.readouterr().err
  assert "optim.lr" in err and "Traceback" not in err


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),  # one host: a single TPU VM / local compile
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "h:1234"}, True),
])
def test_launcher_detection(monkeypatch, env, expected):
  for k in distributed.LAUNCHER_VARS:
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed._launcher_detected() is expected
