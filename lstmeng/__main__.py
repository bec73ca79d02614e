"""``python -m lstmeng``: the same as the ``lstmeng`` command."""

import sys

from lstmeng.cli import main

if __name__ == "__main__":
    sys.exit(main())
