"""Fault tolerance with real processes: SIGKILL and SIGTERM mid-run, a damaged checkpoint,
resuming on another device count, and two processes under jax.distributed.

All runs share one reference: a constant learning rate (so a run stopped early and one run to
the end follow the same schedule) and two data shards (so one process and two processes see the
same global batches).
"""

import shutil
import signal
import socket

import numpy as np
import pytest

from tests.train.trainer_helpers import final_params, losses, run, saved_steps, start, wait_for_checkpoint

STEPS = 16
COMMON = ["optim.schedule=constant", "optim.warmup_steps=0", "data.num_shards=2",
          "mesh.rules=fsdp", "checkpoint.every_steps=4", "checkpoint.keep_last=3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
  """An uninterrupted single-process, single-device run of STEPS steps."""
  wd = tmp_path_factory.mktemp("ref")
  run([*COMMON, f"train.steps={STEPS}", f"train.workdir={wd}"], cache_dir=cache)
  return wd


def _assert_same_params(a, b, exact=True):
  step_a, pa = final_params(a)
  step_b, pb = final_params(b)
  assert step_a == step_b == STEPS
  assert pa.keys() == pb.keys()
  for k in pa:
    if exact:
      np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)
    else:
      np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sigkill_and_sigterm_then_resume_is_bitwise_identical(reference, tmp_path, cache):
  args = [*COMMON, f"train.steps={STEPS}", f"train.workdir={tmp_path}"]
  proc = start(args, cache_dir=cache)
  wait_for_checkpoint(proc, tmp_path, 4)
  proc.kill()                                    # a real, unannounced kill
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  killed_at = max(saved_steps(tmp_path))
  assert killed_at < STEPS

  proc = start(args, cache_dir=cache)            # resume, then preempt politely
  wait_for_checkpoint(proc, tmp_path, killed_at + 1)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-3000:]
  assert f"resumed from {tmp_path}/checkpoints at step {killed_at}" in out
  stopped = max(saved_steps(tmp_path))
  if stopped < STEPS:
    assert "SIGTERM" in out and f"checkpoint saved at step {stopped}" in out

  out = run(args, cache_dir=cache)
  _assert_same_params(reference, tmp_path)


def test_damaged_latest_checkpoint_is_skipped(reference, tmp_path, cache):
  wd = tmp_path / "wd"
  shutil.copytree(reference, wd)
  latest = max(saved_steps(wd))
  for f in (wd / "checkpoints" / str(latest) / "params").rglob("*"):
    if f.is_file() and f.name != "commit_success.txt":
      f.write_bytes(b"garbage")
  out = run([*COMMON, f"train.steps={STEPS}", f"train.workdir={wd}"], cache_dir=cache)
  assert "damaged" in out and "skipped" in out
  assert f"resumed from {wd}/checkpoints at step {latest - 4}" in out
  moved = list((wd / "checkpoints_damaged").iterdir())   # kept for inspection, not deleted
  assert len(moved) == 1 and moved[0].name.startswith(f"{latest}-")
  _assert_same_params(reference, wd)   # redone from the previous checkpoint, same result


def test_changed_shard_count_is_an_error_not_damage(reference, tmp_path, cache):
  wd = tmp_path / "wd"
  shutil.copytree(reference, wd)
  before = saved_steps(wd)
  args = [a for a in COMMON if not a.startswith("data.num_shards")]
  p = start([*args, "data.num_shards=4", f"train.steps={STEPS + 2}", f"train.workdir={wd}"],
            cache_dir=cache)
  out, _ = p.communicate(timeout=240)
  assert p.returncode == 2 and "data.num_shards" in out and "Traceback" not in out
  assert saved_steps(wd) == before and not (wd / "checkpoints_damaged").exists()


def test_resume_on_another_device_count(reference, tmp_path, cache):
  run([*COMMON, "train.steps=8", f"train.workdir={tmp_path}"], devices=4, cache_dir=cache)
  out = run([*COMMON, f"train.steps={STEPS}", f"train.workdir={tmp_path}"], devices=2,
            cache_dir=cache)
  assert "resumed from" in out and "at step 8" in out
  a, b = losses(reference), losses(tmp_path)
  assert sorted(b) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)],
                             rtol=2e-5, atol=2e-5)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
  port = _free_port()
  procs = [start([*COMMON, f"train.steps={STEPS}", f"train.workdir={tmp_path}",
                  f"distributed.coordinator_address=127.0.0.1:{port}",
                  "distributed.num_processes=2", f"distributed.process_id={i}"], devices=1)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert "2 processes" in outs[0] and f"step {STEPS}/{STEPS}" in outs[0]
  assert f"step {STEPS}/{STEPS}" not in outs[1]  # only process 0 logs
  assert saved_steps(tmp_path)[-1] == STEPS
  a, b = losses(reference), losses(tmp_path)
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)],
                             rtol=1e-5, atol=1e-5)
  _assert_same_params(reference, tmp_path, exact=False)
