"""``python -m mgjax.web``: the command line of ``mgjax.inference.web``."""

import sys

from mgjax.inference.web import main

if __name__ == "__main__":
    sys.exit(main())
