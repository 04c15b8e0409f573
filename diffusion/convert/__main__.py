"""``python -m diffusion.convert``."""

import sys

from diffusion.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
