"""``python -m mgjax.eval``: see ``mgjax.eval.harness``."""

import sys

from mgjax.eval.harness import main

sys.exit(main())
