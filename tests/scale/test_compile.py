"""``jaxblocks-compile``: TPU-pod presets compiled ahead of time on CPU, simulated-device runs,
the memory check and the HLO accounting."""

import json

import pytest

from tests.scale.aot_helpers import PRESETS, compile_cli, require_libtpu
from train import compile as aot

# The presets' layouts, shrunk in depth and sequence so the real TPU compiler finishes in CI
# time; the topology, mesh, rules, widths and vocabulary stay those of the preset.
SMALL = ["model.n_layers=1", "data.seq_len=256", "model.max_seq_len=256",
         "data.global_batch_size=256"]


# A small model on the presets' full 256-chip topologies, meshes and rules: the real TPU compiler
# (and Mosaic for the Pallas kernels) in about a minute of CPU time each.
TINY = [*SMALL[:1], "data.seq_len=128", "model.max_seq_len=128", "data.global_batch_size=256",
        "model.d_model=256", "model.mlp.d_ff=512", "model.attention.n_heads=4",
        "model.vocab_size=4096"]


@pytest.mark.parametrize("preset, kernels, size", [
    ("v5e256_125m_fsdp", True, "tiny"), ("v6e256_125m_sp", False, "tiny"),
    # minutes per preset on a 2-core CPU host; run with -m slow
    pytest.param("v5e256_125m_fsdp", True, "small", marks=pytest.mark.slow),
    pytest.param("v6e256_125m_sp", False, "small", marks=pytest.mark.slow)])
def test_tpu_pod_preset_compiles_and_fits(preset, kernels, size, tmp_path):
  require_libtpu()
  out = tmp_path / "report.json"
  r = compile_cli(["--config", str(PRESETS / f"{preset}.yaml"), "--json", str(out),
                   *(TINY if size == "tiny" else SMALL)])
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["n_devices"] == 256 and report["device_kind"].startswith("TPU v")
  assert report["fits"] is True and 0 < report["peak_bytes"] < report["chip_memory_bytes"]
  assert report["argument_bytes"] > 0 and report["peak_bytes"] >= report["argument_bytes"]
  assert report["flops"] and report["flops"] > 0
  # The sharded step communicates across the pod: gradients are reduced, and FSDP weights are
  # gathered (XLA picks all-gather or, for tiny weights, all-to-all / all-reduce).
  c = report["collectives"]
  assert c["all-reduce"] + c["reduce-scatter"] > 0
  assert c["all-gather"] + c["all-to-all"] + c["all-reduce"] > 1
  # The fused-norm Pallas kernel is compiled by Mosaic inside the pod program (forward and
  # backward), not interpreted.
  assert (report["pallas_kernels"] >= 2) if kernels else report["pallas_kernels"] == 0
  assert "per-device memory" in r.stdout and "collectives:" in r.stdout


def test_simulated_devices_and_the_memory_check(tmp_path):
  args = ["--config", str(PRESETS.parent / "tiny.yaml"), "--devices", "4", "mesh.rules=fsdp",
          "mesh.data=1", "mesh.fsdp=-1"]
  ok = compile_cli([*args, "--chip", "h100"])
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert "4 simulated devices" in ok.stdout and "fits" in ok.stdout
  small = compile_cli([*args, "--memory-gib", "0.0001"])
  assert small.returncode == 3
  assert "does not fit" in small.stderr.lower() or "needs" in small.stderr


def test_clear_errors():
  r = compile_cli(["--config", str(PRESETS.parent / "tiny.yaml"), "--devices", "3",
                   "mesh.data=2", "mesh.rules=dp"])
  assert r.returncode == 2 and "config key 'mesh'" in r.stderr
  r = compile_cli(["--config", str(PRESETS.parent / "tiny.yaml"), "--topology", "v9z:1"])
  assert r.returncode == 2 and "unknown TPU topology" in r.stderr
  r = compile_cli(["--config", str(PRESETS.parent / "tiny.yaml")])
  assert r.returncode == 2 and "--topology or --devices" in r.stderr


def test_collective_and_kernel_counting():
  hlo = """
  %ag = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), dimensions={0}
  %ars = (f32[4]{0}, f32[4]{0}) all-reduce-start(f32[4]{0} %x), to_apply=%add
  %ard = f32[4]{0} all-reduce-done((f32[4]{0}, f32[4]{0}) %ars)
  %rs = f32[1]{0} reduce-scatter(f32[8]{0} %y), dimensions={0}
  %cp = f32[4]{0} collective-permute(f32[4]{0} %z), source_target_pairs={{0,1}}
  %k = f32[8,128]{1,0} custom-call(f32[8,128]{1,0} %a), custom_call_target="tpu_custom_call"
  """
  assert aot.count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1,
                                        "all-to-all": 0, "collective-permute": 1}
  assert aot.count_pallas_kernels(hlo) == 1


def test_topology_names_and_chip_memory():
  assert aot.resolve_topology("v5e-256") == "v5e:16x16"
  assert aot.resolve_topology("v5p-128") == "v5p:4x4x4"
  assert aot.resolve_topology("v6e:8x8") == "v6e:8x8"
  assert aot.chip_memory_bytes("TPU v5 lite") == 16 * aot.GIB
  assert aot.chip_memory_bytes("cpu", chip="h100") == 80 * aot.GIB
  assert aot.chip_memory_bytes("cpu") is None
  with pytest.raises(ValueError, match="unknown --chip"):
    aot.chip_memory_bytes("cpu", chip="z80")
