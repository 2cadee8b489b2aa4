"""``python -m sandbox.standin``: the stand-in as a process (see `sandbox.standin.cli`)."""

import sys

from sandbox.standin.cli import main

if __name__ == "__main__":
    sys.exit(main())
