"""``python -m mgjax.train``: see ``mgjax.train.cli``."""

import sys

from mgjax.train.cli import main

sys.exit(main())
