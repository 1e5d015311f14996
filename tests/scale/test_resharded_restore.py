"""A checkpoint written on 8 devices as FSDP is restored on 4 devices as FSDP+TP and on one
device: identical values, the target layout's shardings, and the same next data batches."""

import os

import jax
import numpy as np
import pytest

from jaxblocks import model as jb_model
from jaxblocks import sharding as shd
from tests.train.trainer_helpers import TINY
from train import checkpoint, config as config_lib, loop, optim
from train.data import pipeline, sources, tokenizers


def _setup(cfg, devices, mesh_sizes, rules_name):
  mesh = shd.make_mesh(mesh_sizes, devices=devices)
  rules = shd.get_rules(rules_name)
  specs = jb_model.specs(cfg.model)
  optimizer, _ = optim.make(cfg.optim, specs, cfg.train.steps)
  state_sh, abstract = loop.train_state_layout(specs, optimizer, cfg.model, mesh, rules)
  tokenizer = tokenizers.load(cfg.data.tokenizer, cfg.data.tokenizer_path)
  train_docs, _ = pipeline.split(sources.documents(cfg.data), cfg.data.eval_fraction)
  data_iter = iter(pipeline.train_dataset(cfg.data, tokenizer, train_docs,
                                          pipeline.layout(cfg.data, 0, 1)))
  return mesh, rules, optimizer, state_sh, abstract, data_iter


def _host(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_restore_fsdp8_as_fsdp_tp4_and_single_device(tmp_path):
  assert jax.device_count() >= 8
  cfg = config_lib.load(None, [*TINY, "model.attention.n_heads=4", "model.mlp.d_ff=128",
                               "mesh.rules=fsdp", "train.steps=10"])
  devices = jax.devices()
  mesh, rules, optimizer, state_sh, _, data_iter = _setup(
      cfg, devices[:8], {"data": 1, "fsdp": 8}, "fsdp")
  params = jb_model.init(cfg.model, jax.random.key(3), mesh, rules)
  # Non-trivial optimizer state: one Adam update from a random gradient.
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
  opt_state = jax.jit(optimizer.init, out_shardings=state_sh["opt_state"])(params)
  _, opt_state = jax.jit(optimizer.update, out_shardings=(state_sh["params"],
                                                           state_sh["opt_state"]))(
      grads, opt_state, params)
  state = {"params": params, "opt_state": opt_state,
           "model_state": jax.device_put(jb_model.init_state(cfg.model), state_sh["model_state"])}
  for _ in range(3):
    next(data_iter)
  ckpt_cfg = config_lib.CheckpointConfig(async_save=False)
  mgr = checkpoint.manager(os.path.join(tmp_path, "checkpoints"), ckpt_cfg)
  checkpoint.save(mgr, state, data_iter, {"step": 3, "rng": [0, 0], "config": {}}, force=True)
  mgr.wait_until_finished()
  mgr.close()
  expected_batches = [next(data_iter) for _ in range(2)]
  expected = {"params": _host(params), "opt_state": _host(opt_state)}
  assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
      state_sh["params"]))  # the saved layout really is sharded

  for target_devices, sizes, rules_name in [(devices[:4], {"data": 1, "fsdp": 2, "tensor": 2},
                                             "fsdp_tp"),
                                            (devices[:1], {"data": 1}, "dp")]:
    _, _, _, target_sh, abstract, fresh_iter = _setup(cfg, target_devices, sizes, rules_name)
    mgr = checkpoint.manager(os.path.join(tmp_path, "checkpoints"), ckpt_cfg)
    restored, meta = checkpoint.restore_latest(mgr, abstract, fresh_iter)
    mgr.close()
    assert meta["step"] == 3
    for part in ("params", "opt_state"):
      got = _host(restored[part])
      assert got.keys() == expected[part].keys()
      for k in got:
        np.testing.assert_array_equal(got[k], expected[part][k], err_msg=f"{rules_name} {k}")
      for arr, sh in zip(jax.tree.leaves(restored[part]), jax.tree.leaves(target_sh[part])):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim)
        assert len(arr.sharding.device_set) == len(target_devices)
    for want in expected_batches:
      got_batch = next(fresh_iter)
      for k in want:
        np.testing.assert_array_equal(got_batch[k], want[k], err_msg=f"{rules_name} batch {k}")
    if rules_name == "fsdp_tp":
      tp = [s.spec for s in jax.tree.leaves(target_sh["params"]) if "tensor" in str(s.spec)]
      assert tp  # the target layout really splits over the tensor axis
