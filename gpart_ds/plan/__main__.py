"""python -m gpart_ds.plan [sweep] ...: the planner's command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
