"""MLproject entry point `train`: see `skinml train --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["train", *sys.argv[1:]], prog_name="skinml")
