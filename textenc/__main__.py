"""``python -m textenc``: the same as the ``textenc`` command."""

import sys

from textenc.cli import main

if __name__ == "__main__":
    sys.exit(main())
