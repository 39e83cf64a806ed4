#!/usr/bin/env python3
"""microgpt-bench: `python bench.py --help`. Runs from the checkout; see README.md."""
import sys

from bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
