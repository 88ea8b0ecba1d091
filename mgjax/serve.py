"""``python -m mgjax.serve``: the command line of ``mgjax.inference.serve``."""

import sys

from mgjax.inference.serve import main

if __name__ == "__main__":
    sys.exit(main())
