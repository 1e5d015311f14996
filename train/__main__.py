"""``python -m train``: the same as ``jaxblocks-train``."""

import sys

from train.cli import main

sys.exit(main())
