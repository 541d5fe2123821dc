"""`python -m clipscale.launch [torchrun arguments] -m clipscale.train ...`: the launcher's command
(torchrun with one-line endings; the code is in clipscale.job.launch)."""

import sys

from .job.launch import main

if __name__ == "__main__":
    sys.exit(main())
