"""MLproject entry point `evaluate`: see `skinml evaluate --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["evaluate", *sys.argv[1:]], prog_name="skinml")
