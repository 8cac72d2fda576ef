"""python -m gpart_ds.config --markdown: docs/configuration.md on stdout."""

import sys

from .docs import schema_markdown

if sys.argv[1:] != ["--markdown"]:
    sys.exit("usage: python -m gpart_ds.config --markdown")
sys.stdout.write(schema_markdown())
