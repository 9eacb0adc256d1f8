"""`python -m ember ...` runs the `ember` command (as torchrun -m ember does)."""

from ember.cli import main

if __name__ == "__main__":
    main()
