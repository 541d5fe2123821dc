"""`python -m clipscale.cli ...`: the same as `clipscale ...`."""

import sys

from . import main

sys.exit(main())
