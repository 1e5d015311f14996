"""Golden sharding snapshots: every preset's parameter and optimizer-state PartitionSpecs, from
abstract shapes on the preset's TPU topology, must equal ``tests/golden/<preset>.json``.

After an intended change, rewrite a snapshot with
``jaxblocks-compile --config configs/presets/<preset>.yaml --update-golden`` and review the diff.
"""

import json
import os

import pytest

from tests.scale.aot_helpers import GOLDEN, PRESETS, require_libtpu
from train import compile as aot
from train import config as config_lib

PRESET_NAMES = sorted(p.stem for p in PRESETS.glob("*.yaml"))


def test_every_preset_has_a_snapshot():
  assert PRESET_NAMES and PRESET_NAMES == sorted(p.stem for p in GOLDEN.glob("*.json"))


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_shardings_match_golden(preset):
  require_libtpu()
  path = PRESETS / f"{preset}.yaml"
  args, _ = aot._parser().parse_known_args(aot.target_args(str(path)))
  cfg = config_lib.load(str(path))
  before = dict(os.environ)
  snapshot = json.loads(json.dumps(aot.sharding_snapshot(cfg, aot.tpu_devices(args.topology))))
  assert dict(os.environ) == before  # libtpu's variables must not leak into later child processes
  golden = json.loads((GOLDEN / f"{preset}.json").read_text())
  assert snapshot["mesh"] == golden["mesh"] and snapshot["rules"] == golden["rules"]
  for part in ("params", "opt_state"):
    changed = {k: (golden[part].get(k), v) for k, v in snapshot[part].items()
               if golden[part].get(k) != v}
    missing = sorted(set(golden[part]) - set(snapshot[part]))
    assert not changed and not missing, (
        f"{preset} {part} shardings changed (golden, now): {changed}; missing: {missing}. If "
        "intended: jaxblocks-compile --config " f"{path} --update-golden")
  # Weights and their Adam moments are sharded, never silently replicated.
  sharded = [k for k, v in snapshot["opt_state"].items() if ".mu" in k and v["spec"]]
  assert len(sharded) >= len([v for v in snapshot["params"].values() if v["spec"]])
