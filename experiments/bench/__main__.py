"""python -m experiments.bench: GPart vs LoRA vs full fine-tuning (see bench/compare.py)."""

import sys

from .compare import cli

if __name__ == "__main__":
    sys.exit(cli())
