"""MLproject entry point `cv`: see `skinml cv --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["cv", *sys.argv[1:]], prog_name="skinml")
