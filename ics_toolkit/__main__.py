"""``python -m ics_toolkit``: the ``ics-toolkit`` command line."""

import sys

from ics_toolkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
