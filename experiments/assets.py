"""The asset recipes moved into the package (gpart_ds/assets/): the installed entry point
runs a config's `prepare:` (launch/train.py). This name stays for the study and for
`python -m experiments.assets`, which runs `python -m gpart_ds.assets`."""
import sys

from gpart_ds.assets import RECIPES, check_recipes, ensure, main, prepare

__all__ = ["RECIPES", "check_recipes", "ensure", "main", "prepare"]

if __name__ == "__main__":
    sys.exit(main())
