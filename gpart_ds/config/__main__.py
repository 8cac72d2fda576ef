"""python -m gpart_ds.config --markdown: docs/configuration.md on stdout."""

import sys

from .docs import schema_markdown

if sys.argv[1:] != ["--markdown"]:
    print("usage: python -m gpart_ds.config --markdown", file=sys.stderr)
    sys.exit(2)  # a usage error, as every other command's
sys.stdout.write(schema_markdown())
