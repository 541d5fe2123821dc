#!/usr/bin/env python
"""Same as `clipscale shards inspect ...`: a thin wrapper for users who prefer scripts."""

import sys

from clipscale.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", "inspect", *sys.argv[1:]]))
