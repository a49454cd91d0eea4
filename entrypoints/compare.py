"""MLproject entry point `compare`: see `skinml compare --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["compare", *sys.argv[1:]], prog_name="skinml")
