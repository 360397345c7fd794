"""`python -m taskd` runs the command line."""

import sys

from taskd.cli import main

sys.exit(main())
