"""``python -m mgjax.demo``: see ``mgjax.demo.tour``."""

import sys

from mgjax.demo.tour import main

sys.exit(main())
