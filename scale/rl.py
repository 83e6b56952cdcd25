"""`python -m scale.rl`: see scale/experiments.py."""

import sys

from .experiments import main

if __name__ == "__main__":
    sys.exit(main("rl"))
