"""``python -m fisherlab`` runs the command line."""

import sys

from fisherlab.cli import main

if __name__ == "__main__":
    sys.exit(main())
