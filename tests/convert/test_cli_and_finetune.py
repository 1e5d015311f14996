"""``jaxblocks-convert`` and ``train.init_from``: import a Hugging Face Llama, fine-tune it for a
few steps, export the run's checkpoint back to a Hugging Face directory that transformers loads."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxblocks.convert import cli, load  # noqa: E402
from jaxblocks.errors import ConfigError  # noqa: E402

TRAIN = ["data.seq_len=32", "data.global_batch_size=8", "data.prefetch=0", "optim.lr=1e-3",
         "optim.warmup_steps=1", "logging.every_steps=1", "logging.tensorboard=false",
         "train.eval_every=0", "train.sample_tokens=0", "mesh.rules=dp", "train.steps=2",
         "checkpoint.every_steps=2", "checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=64)
  m = transformers.LlamaForCausalLM(cfg).eval()
  d = str(tmp_path_factory.mktemp("llama256"))
  m.save_pretrained(d)
  return d


def test_import_finetune_export(hf_llama, tmp_path, capsys):
  from train import config as config_lib
  from train import loop
  model_yaml = str(tmp_path / "model.yaml")
  assert cli.main(["import", hf_llama, "--output", model_yaml]) == 0
  workdir = str(tmp_path / "run")
  cfg = config_lib.load(model_yaml, [*TRAIN, f"train.workdir={workdir}",
                                     f"train.init_from={hf_llama}"])
  summary = loop.run(cfg)
  assert np.isfinite(summary["last_loss"])
  assert "initialised from" in capsys.readouterr().out

  out_dir = str(tmp_path / "exported")
  assert cli.main(["export", workdir, out_dir, "--architecture", "LlamaForCausalLM"]) == 0
  tuned, original = load(out_dir), load(hf_llama)
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(tuned.params), jax.tree.leaves(original.params))]
  assert 0 < max(diffs) < 0.05  # started from the checkpoint and moved a little
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir)
  assert reloaded.config.num_key_value_heads == 2


def test_init_from_mismatch_names_keys(hf_llama, tmp_path):
  from train import config as config_lib
  from train import loop
  model_yaml = str(tmp_path / "model.yaml")
  assert cli.main(["import", hf_llama, "--output", model_yaml]) == 0
  cfg = config_lib.load(model_yaml, [*TRAIN, f"train.workdir={tmp_path / 'run'}",
                                     f"train.init_from={hf_llama}", "model.mlp.d_ff=96"])
  with pytest.raises(ConfigError, match=r"train.init_from.*model.mlp.d_ff=96.*64"):
    loop.run(cfg)


def test_cli_errors(tmp_path, capsys):
  assert cli.main(["import", str(tmp_path)]) == 2
  assert "no config.json" in capsys.readouterr().err
  assert cli.main(["export", str(tmp_path), str(tmp_path / "o"), "--architecture",
                   "LlamaForCausalLM"]) == 2
  assert "no checkpoints" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "o")
