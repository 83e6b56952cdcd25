"""`python -m scale.exp2`: see scale/experiments.py."""

import sys

from .experiments import main

if __name__ == "__main__":
    sys.exit(main("exp2"))
