"""``python -m mgjax.formatters``: the command line of ``mgjax.data.formatters``."""

import sys

from mgjax.data.formatters import main

if __name__ == "__main__":
    sys.exit(main())
