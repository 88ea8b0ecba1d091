"""``python -m mgjax.plan``: the command line of ``mgjax.train.plan``: a training run's per-device memory, FLOPs and
step time, or with ``--serve`` the per-chip memory of a served model (weights, KV cache, working set)."""

import sys

from mgjax.train.plan import main

if __name__ == "__main__":
    sys.exit(main())
