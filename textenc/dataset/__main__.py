"""``python -m textenc.dataset``: the same as ``textenc encode-dataset``."""

import sys

from textenc.dataset.cli import main

if __name__ == "__main__":
    sys.exit(main())
