"""MLproject entry point `ensemble`: see `skinml ensemble --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["ensemble", *sys.argv[1:]], prog_name="skinml")
