"""`python -m visroute ...` runs the `visroute` command (also under `accelerate launch -m visroute`)."""

import sys

from visroute.cli import main

sys.exit(main())
