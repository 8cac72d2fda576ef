"""python -m gpart_ds.assets RECIPE... [--root DIR]"""

import sys

from . import main

sys.exit(main())
