"""`python -m clipscale.train --config X.yaml [key=value ...]` (what torchrun and srun start on every rank)."""

import sys

from .run import main

sys.exit(main())
