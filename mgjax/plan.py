"""``python -m mgjax.plan``: the command line of ``mgjax.train.plan``."""

import sys

from mgjax.train.plan import main

if __name__ == "__main__":
    sys.exit(main())
