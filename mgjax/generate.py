"""``python -m mgjax.generate``: the command line of ``mgjax.inference.generate``."""

import sys

from mgjax.inference.generate import main

if __name__ == "__main__":
    sys.exit(main())
