#!/usr/bin/env python
"""Same as `clipscale shards verify ...`: a thin wrapper for users who prefer scripts."""

import sys

from clipscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "verify", *sys.argv[1:]]))
