"""`python -m ember ...` runs the `ember` command (as torchrun -m ember does), exit status included."""

import sys

from ember.cli import main

if __name__ == "__main__":
    sys.exit(main())
