"""Four processes under ``jax.distributed`` (loopback coordinator, gloo CPU collectives) train and
checkpoint together; two processes of two devices each resume that checkpoint; the result
matches one process reading the same global batches."""

import socket

import numpy as np

from tests.train.trainer_helpers import final_params, losses, run, saved_steps, start

COMMON = ["optim.schedule=constant", "optim.warmup_steps=0", "data.num_shards=4",
          "mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=-1", "checkpoint.every_steps=2",
          "checkpoint.keep_last=2", "checkpoint.async_save=false"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(n_processes, devices_each, args, workdir):
  port = _free_port()
  procs = [start([*COMMON, *args, f"train.workdir={workdir}",
                  f"distributed.coordinator_address=127.0.0.1:{port}",
                  f"distributed.num_processes={n_processes}", f"distributed.process_id={i}"],
                 devices=devices_each) for i in range(n_processes)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-3000:]}"
  return outs


def test_four_processes_train_and_checkpoint_then_two_resume(tmp_path):
  ref, multi = tmp_path / "ref", tmp_path / "multi"
  run([*COMMON, "train.steps=6", f"train.workdir={ref}"])
  outs = _launch(4, 1, ["train.steps=4"], multi)
  assert "4 processes" in outs[0] and "step 4/4" in outs[0]
  assert all("step 4/4" not in o for o in outs[1:])  # only process 0 reports
  assert saved_steps(multi) == [2, 4]
  outs = _launch(2, 2, ["train.steps=6"], multi)
  assert "resumed from" in outs[0] and "at step 4" in outs[0] and "2 processes" in outs[0]
  assert saved_steps(multi)[-1] == 6
  a, b = losses(ref), losses(multi)
  np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)],
                             rtol=1e-5, atol=1e-5)
  step_a, pa = final_params(ref)
  step_b, pb = final_params(multi)
  assert step_a == step_b == 6 and pa.keys() == pb.keys()
  # Gloo's cross-process reductions sum in another order than one process does; Adam turns a
  # gradient rounding difference on a near-zero gradient into an update difference of ~1e-5.
  for k in pa:
    np.testing.assert_allclose(pa[k], pb[k], rtol=1e-5, atol=5e-5, err_msg=k)
