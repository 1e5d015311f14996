"""Running ``jaxblocks-compile`` in a subprocess for the ahead-of-time compile tests."""

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from tests.train.trainer_helpers import REPO

PRESETS = REPO / "configs" / "presets"
GOLDEN = REPO / "tests" / "golden"


def require_libtpu() -> None:
  """libtpu comes with the ``test`` extra on Linux x86-64, where a missing one is an error."""
  if importlib.util.find_spec("libtpu") is not None:
    return
  if platform.system() == "Linux" and platform.machine() == "x86_64":
    pytest.fail("libtpu is missing: install the test extra (pip install -e '.[test]')")
  pytest.skip("libtpu has no wheel for this platform")


def compile_cli(args, timeout=600) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)
  if "--devices" in args:  # simulated CPU devices: skip XLA's expensive LLVM passes (TPU
    # compiles keep the default options); jaxblocks-compile adds the device count itself.
    env["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                        "--xla_llvm_disable_expensive_passes=true")
  return subprocess.run([sys.executable, "-m", "train.compile", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
