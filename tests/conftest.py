"""Test-suite setup: 8 simulated CPU devices for the multi-device tests."""

import os

# 8 simulated devices; XLA's CPU backend without its expensive LLVM optimisations: the tests are
# dominated by compile time of small programs, which this more than halves (results are compared
# against references compiled the same way, never against stored numbers).
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hypothesis  # noqa: E402

hypothesis.settings.register_profile(
    "jaxblocks", max_examples=15, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow,
                           hypothesis.HealthCheck.function_scoped_fixture])
hypothesis.settings.load_profile("jaxblocks")
