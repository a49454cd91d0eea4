"""MLproject entry point `sweep`: see `skinml sweep --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["sweep", *sys.argv[1:]], prog_name="skinml")
