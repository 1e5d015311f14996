"""Optimizers, schedules, the loss mask, gradient accumulation and the NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxblocks import AttentionConfig, ModelConfig
from jaxblocks import model as jb_model
from train import optim, step as step_lib

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=2, max_seq_len=64,
                  attention=AttentionConfig(n_heads=2))


def _batch(key, b=4, t=17):
  tokens = jax.random.randint(key, (b, t), 0, 256, jnp.int32)
  seg = jnp.concatenate([jnp.ones((b, 9), jnp.int32), 2 * jnp.ones((b, t - 9), jnp.int32)], 1)
  seg = seg.at[:, -2:].set(0)
  pos = jnp.asarray(jb_model.segment_positions(seg))
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def test_schedules():
  for name in ("cosine", "linear", "wsd", "constant"):
    lr = optim.schedule(optim.OptimConfig(schedule=name, lr=1.0, warmup_steps=10,
                                          min_lr_ratio=0.1, decay_fraction=0.2), 100)
    assert float(lr(0)) == pytest.approx(0.0)
    assert float(lr(10)) == pytest.approx(1.0)
    if name != "constant":
      assert float(lr(100)) == pytest.approx(0.1, abs=1e-6)
  wsd = optim.schedule(optim.OptimConfig(schedule="wsd", lr=1.0, warmup_steps=10), 100)
  assert float(wsd(79)) == pytest.approx(1.0) and float(wsd(90)) < 1.0


def test_weight_decay_mask_excludes_norms_biases_embeddings():
  specs = jb_model.specs(CFG)
  mask = optim.decay_mask(specs, optim.OptimConfig())
  assert mask["embed"]["tokens"] is False
  assert mask["final_norm"]["scale"] is False
  flat = jax.tree_util.tree_leaves_with_path(mask)
  decayed = {jax.tree_util.keystr(p) for p, v in flat if v}
  assert decayed and all("norm" not in k and "embed" not in k for k in decayed)
  assert optim.decay_mask(specs, optim.OptimConfig(decay_embeddings=True))["embed"]["tokens"]


@pytest.mark.parametrize("name", ["adamw", "lion", "muon"])
def test_optimizers_lower_the_loss(name):
  specs = jb_model.specs(CFG)
  opt, lr = optim.make(optim.OptimConfig(name=name, lr=1e-2 if name != "lion" else 1e-3,
                                         warmup_steps=0, schedule="constant"), specs, 10)
  params = jb_model.init(CFG, jax.random.key(0))
  state = {"step": jnp.int32(0), "params": params, "opt_state": opt.init(params),
           "model_state": {}}
  fn = jax.jit(step_lib.make_train_step(CFG, opt, lr, grad_accum_steps=1, z_loss=0.0))
  batch = _batch(jax.random.key(1))
  losses = []
  for _ in range(6):
    state, m = fn(state, batch)
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0] - 0.1


def test_loss_masks_padding_and_document_boundaries():
  params = jb_model.init(CFG, jax.random.key(0))
  batch = _batch(jax.random.key(2))
  inputs, targets, mask = step_lib.split_batch(batch)
  assert not mask[:, 8].any()        # token 8 would predict the first token of document 2
  assert not mask[:, -2:].any()      # padding
  assert mask[:, :8].all()
  logits = jb_model.apply(params, inputs["tokens"], CFG, positions=inputs["positions"],
                          segment_ids=inputs["segment_ids"])
  logp = jax.nn.log_softmax(logits)
  manual = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = jnp.sum(manual * mask) / jnp.sum(mask)
  s, n = step_lib.make_eval_step(CFG)(params, {}, batch)
  np.testing.assert_allclose(s / n, expected, rtol=1e-5)


def test_grad_accumulation_matches_full_batch():
  specs = jb_model.specs(CFG)
  opt, lr = optim.make(optim.OptimConfig(warmup_steps=0, schedule="constant"), specs, 10)
  params = jb_model.init(CFG, jax.random.key(0))
  batch = _batch(jax.random.key(3))
  outs = []
  for accum in (1, 4):
    state = {"step": jnp.int32(0), "params": params, "opt_state": opt.init(params),
             "model_state": {}}
    fn = jax.jit(step_lib.make_train_step(CFG, opt, lr, grad_accum_steps=accum, z_loss=1e-4))
    outs.append(fn(state, batch))
  (s1, m1), (s4, m4) = outs
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_nonfinite_step_keeps_parameters():
  specs = jb_model.specs(CFG)
  opt, lr = optim.make(optim.OptimConfig(warmup_steps=0, schedule="constant"), specs, 10)
  params = jb_model.init(CFG, jax.random.key(0))
  bad = jax.tree.map(lambda x: x, params)
  bad["embed"]["tokens"] = bad["embed"]["tokens"].at[0, 0].set(jnp.nan)
  state = {"step": jnp.int32(0), "params": bad, "opt_state": opt.init(params), "model_state": {}}
  fn = jax.jit(step_lib.make_train_step(CFG, opt, lr, grad_accum_steps=1, z_loss=0.0))
  batch = _batch(jax.random.key(1))
  batch["tokens"] = batch["tokens"].at[:, 0].set(0)
  new, m = fn(state, batch)
  assert not bool(m["finite"])
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(bad)):
    np.testing.assert_array_equal(a, b)
