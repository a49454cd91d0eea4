"""MLproject entry point `main`: see `skinml main --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["main", *sys.argv[1:]], prog_name="skinml")
