"""python -m gpart_ds.export [verify] ... (the CLI: cli.py)"""

import sys

from .cli import main

sys.exit(main())
