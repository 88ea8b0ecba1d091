"""``python -m mgjax.chat``: the command line of ``mgjax.inference.chat``."""

import sys

from mgjax.inference.chat import main

if __name__ == "__main__":
    sys.exit(main())
