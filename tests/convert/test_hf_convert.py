"""Hugging Face interop: every architecture against transformers (PyTorch, CPU).

For each architecture a tiny random model is built with ``transformers``, all its weights are
randomised (so norm gains and biases are not at their trivial init), saved as safetensors,
imported, and compared: logits on random tokens (float32, max relative error < 1e-4), greedy
generation of 20 tokens, and import → export → import bit-identity. The tricks keep HF's logits
on imported models.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxblocks import model  # noqa: E402
from jaxblocks import params as P  # noqa: E402
from jaxblocks import sharding  # noqa: E402
from jaxblocks.convert import CheckpointError, HFModel, UnsupportedError, hf, load, save  # noqa: E402
from jaxblocks.convert import safetensors_io  # noqa: E402

VOCAB, SEQ, PROMPT, NEW = 96, 16, 6, 20
RTOL = 1e-4

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64)


def _hf_configs():
  tf = transformers
  return {
      "llama": lambda: tf.LlamaConfig(**_COMMON, num_key_value_heads=2, rope_theta=500.0),
      "llama_tied_bias": lambda: tf.LlamaConfig(**_COMMON, num_key_value_heads=1,
                                                attention_bias=True, mlp_bias=True,
                                                tie_word_embeddings=True),
      "mistral": lambda: tf.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=5),
      "qwen2": lambda: tf.Qwen2Config(**_COMMON, num_key_value_heads=2),
      "qwen2_sliding": lambda: tf.Qwen2Config(**_COMMON, num_key_value_heads=2,
                                              use_sliding_window=True, sliding_window=5,
                                              max_window_layers=1),
      "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                    n_positions=64),
      "pythia": lambda: tf.GPTNeoXConfig(**_COMMON, rotary_pct=0.25),
      "olmo2": lambda: tf.Olmo2Config(**_COMMON, num_key_value_heads=2),
      "gemma2": lambda: tf.Gemma2Config(**_COMMON, num_key_value_heads=2, head_dim=16,
                                        sliding_window=5, query_pre_attn_scalar=24,
                                        attn_logit_softcapping=5.0,
                                        final_logit_softcapping=3.0),
      "gemma3": lambda: tf.Gemma3TextConfig(**_COMMON, num_key_value_heads=2, head_dim=16,
                                            sliding_window=5,
                                            layer_types=["sliding_attention", "full_attention"]),
  }


ARCHS = list(_hf_configs())


def _randomise(m):
  """Every parameter perturbed (norm gains away from 1/0, biases non-zero)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """name -> (model dir, torch model), built lazily once per module."""
  cache = {}

  def get(name):
    if name not in cache:
      torch.manual_seed(0)
      cfg = _hf_configs()[name]()
      m = transformers.AutoModelForCausalLM.from_config(cfg).eval()
      _randomise(m)
      d = str(tmp_path_factory.mktemp(name))
      m.save_pretrained(d)
      cache[name] = (d, m)
    return cache[name]
  return get


def _tokens(seed=0, shape=(2, SEQ)):
  return np.random.RandomState(seed).randint(0, VOCAB, shape)


def _hf_logits(m, tokens):
  with torch.no_grad():
    return m(torch.tensor(tokens)).logits.float().numpy()


def _rel_err(a, ref):
  return float(np.abs(np.asarray(a) - ref).max() / np.abs(ref).max())


def _hf_greedy(m, prompt, n):
  toks = torch.tensor(prompt)
  with torch.no_grad():
    for _ in range(n):
      nxt = m(toks).logits[:, -1].argmax(-1, keepdim=True)
      toks = torch.cat([toks, nxt], dim=1)
  return toks[:, prompt.shape[1]:].numpy()


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.mark.parametrize("name", ARCHS)
def test_logits_generation_and_round_trip(name, hf_models, tmp_path):
  d, m = hf_models(name)
  imported = load(d)
  tokens = _tokens()
  ref = _hf_logits(m, tokens)
  out = model.apply(imported.params, jnp.asarray(tokens), imported.config)
  assert _rel_err(out, ref) < RTOL

  prompt = _tokens(1, (2, PROMPT))
  got = model.generate(imported.params, jnp.asarray(prompt), imported.config,
                       max_new_tokens=NEW, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(got), _hf_greedy(m, prompt, NEW))

  out_dir = str(tmp_path / "export")
  save(imported, out_dir)
  again = load(out_dir)
  assert again.config == imported.config and again.architecture == imported.architecture
  for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(again.params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The exported tensors are the original checkpoint's tensors, bit for bit.
  orig, exported = safetensors_io.SafetensorsReader(d), safetensors_io.SafetensorsReader(out_dir)
  assert exported.names() == orig.names()
  for n in orig.names():
    full = tuple(slice(0, s) for s in orig.shape(n))
    np.testing.assert_array_equal(exported.read_slice(n, full), orig.read_slice(n, full), err_msg=n)
  # transformers loads the export and gives the same logits.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens), ref)


# ----------------------------------------------------------------------------- tricks


def test_gpt2_pre_rmsnorm_and_crmsnorm_keep_hf_logits(hf_models):
  from jaxblocks.tricks import flashnorm, rmsnorm_conversion
  d, m = hf_models("gpt2")
  imported = load(d)
  tokens = _tokens()
  ref = _hf_logits(m, tokens)
  p_rms, cfg_rms = rmsnorm_conversion.to_pre_rmsnorm(imported.params, imported.config)
  assert cfg_rms.norm.kind == "rmsnorm"
  assert _rel_err(model.apply(p_rms, jnp.asarray(tokens), cfg_rms), ref) < RTOL
  p_w, cfg_w = p_rms, cfg_rms
  if cfg_rms.norm.scale:  # the conversion may leave gains for FlashNorm to fold
    p_w, cfg_w = flashnorm.fold_norm_weights(p_rms, cfg_rms)
  p_c, cfg_c = rmsnorm_conversion.to_pre_crmsnorm(p_w, cfg_w)
  assert cfg_c.norm.kind == "crmsnorm"
  assert _rel_err(model.apply(p_c, jnp.asarray(tokens), cfg_c), ref) < RTOL


@pytest.mark.parametrize("name", ["llama", "llama_tied_bias", "gemma2", "gemma3"])
def test_flashnorm_keeps_hf_logits(name, hf_models):
  from jaxblocks.tricks import flashnorm
  d, m = hf_models(name)
  imported = load(d)
  tokens = _tokens()
  p, cfg = flashnorm.fold_norm_weights(imported.params, imported.config)
  assert "scale" not in p["layers"][0]["attn_norm"]
  if name.startswith("gemma"):  # Peri-LN: the (1 + w) output-norm gains stay
    assert "scale" in p["layers"][0]["attn_out_norm"] and cfg.norm.scale_offset == 1.0
  assert _rel_err(model.apply(p, jnp.asarray(tokens), cfg), _hf_logits(m, tokens)) < RTOL


@pytest.mark.parametrize("name", ["pythia", "llama"])
def test_first_layer_precompute_keeps_hf_logits_and_generation(name, hf_models):
  from jaxblocks.tricks import precompute_first_layer
  d, m = hf_models(name)
  imported = load(d)
  p, cfg = precompute_first_layer.convert(imported.params, imported.config)
  assert cfg.precomputed_first_layer and "first_layer" in p["embed"]
  tokens = _tokens()
  assert _rel_err(model.apply(p, jnp.asarray(tokens), cfg), _hf_logits(m, tokens)) < RTOL
  prompt = _tokens(1, (2, PROMPT))
  got = model.generate(p, jnp.asarray(prompt), cfg, max_new_tokens=8, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(got), _hf_greedy(m, prompt, 8))


# ----------------------------------------------------------------------------- sharded loading


def test_sharded_load_reads_only_each_shard(hf_models, monkeypatch):
  """On 8 devices every parameter lands with its spec's sharding, equal to the unsharded load,
  and no read from the checkpoint is larger than one device's shard."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  d, _ = hf_models("llama")
  reference = load(d)
  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  reads = []
  original = safetensors_io.SafetensorsReader.read_slice

  def recording(self, name, index):
    out = original(self, name, index)
    reads.append((name, out.size, self.shape(name)))
    return out

  monkeypatch.setattr(safetensors_io.SafetensorsReader, "read_slice", recording)
  sharded = load(d, mesh=mesh, rules="fsdp_tp")
  specs = model.specs(sharded.config)
  want = P.shardings(specs, mesh, "fsdp_tp")
  for a, s, b in zip(jax.tree.leaves(sharded.params),
                     jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
                     jax.tree.leaves(reference.params)):
    assert a.sharding.is_equivalent_to(s, a.ndim)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  embed_reads = [size for name, size, shape in reads if name == "model.embed_tokens.weight"]
  assert embed_reads and max(embed_reads) < VOCAB * 32  # a slice, never the whole table
  # every q_proj read covers at most half the heads (tensor axis 2) of one layer
  q_reads = [size for name, size, shape in reads if name.endswith("q_proj.weight")]
  assert q_reads and max(q_reads) <= 32 * 32 // 2


# ----------------------------------------------------------------------------- malformed inputs


def _copy(d, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(d, out)
  return out


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_unknown_architecture(hf_models, tmp_path):
  d = _copy(hf_models("llama")[0], tmp_path)
  _edit_config(d, architectures=["FancyForCausalLM"], model_type="fancy")
  with pytest.raises(UnsupportedError, match="unknown architecture.*FancyForCausalLM"):
    load(d)


def test_wrong_shape_names_tensor(hf_models, tmp_path):
  d = _copy(hf_models("llama")[0], tmp_path)
  _edit_config(d, intermediate_size=48)
  with pytest.raises(CheckpointError, match=r"mlp.*proj.weight' has shape \[.*\], expected"):
    load(d)


def test_missing_shard(hf_models, tmp_path):
  d, _ = hf_models("qwen2")
  imported = load(d)
  out = str(tmp_path / "sharded")
  files = save(imported, out, max_shard_bytes=20_000)
  assert len(files) > 1 and os.path.exists(os.path.join(out, safetensors_io.INDEX_FILE))
  again = load(out)  # the sharded export loads
  for a, b in zip(jax.tree.leaves(imported.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  os.remove(os.path.join(out, files[-1]))
  with pytest.raises(CheckpointError, match=f"missing shard file.*{files[-1]}"):
    load(out)


def test_missing_tensor_and_pickle_only(hf_models, tmp_path):
  from safetensors.numpy import save_file
  d = _copy(hf_models("llama")[0], tmp_path)
  reader = safetensors_io.SafetensorsReader(d)
  tensors = {n: reader.read_slice(n, tuple(slice(0, s) for s in reader.shape(n)))
             for n in reader.names() if n != "model.norm.weight"}
  save_file(tensors, os.path.join(d, "model.safetensors"))
  with pytest.raises(CheckpointError, match="'model.norm.weight'.*missing"):
    load(d)
  os.remove(os.path.join(d, "model.safetensors"))
  open(os.path.join(d, "pytorch_model.bin"), "wb").close()
  with pytest.raises(CheckpointError, match="pickle"):
    load(d)


def test_unsupported_options_are_named(hf_models, tmp_path):
  d = _copy(hf_models("llama")[0], tmp_path)
  _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0})
  with pytest.raises(UnsupportedError, match="rope type 'llama3'"):
    load(d)
  _edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": 1e4},
               hidden_act="gelu")
  with pytest.raises(UnsupportedError, match="hidden_act='gelu'"):
    load(d)
  _edit_config(d, hidden_act="silu", tie_word_embeddings=True)  # lm_head present: tie mismatch
  with pytest.raises(CheckpointError, match="lm_head.weight.*tie_word_embeddings"):
    load(d)


def test_export_refuses_inexpressible_model(hf_models):
  imported = load(hf_models("llama")[0])
  cfg = imported.config.replace(block=imported.config.block.__class__(topology="peri"))
  with pytest.raises(UnsupportedError, match="model.block.topology='peri'"):
    save(HFModel(cfg, imported.params, "LlamaForCausalLM"), "/nonexistent")
  with pytest.raises(UnsupportedError, match="unknown architecture 'BertModel'"):
    save(HFModel(imported.config, imported.params, "BertModel"), "/nonexistent")


def test_config_missing(tmp_path):
  with pytest.raises(CheckpointError, match="no config.json"):
    load(str(tmp_path))
