"""``python -m mgjax.quantize``: the command line of ``mgjax.inference.quantize``."""

import sys

from mgjax.inference.quantize import main

if __name__ == "__main__":
    sys.exit(main())
