"""MLproject entry point `register`: see `skinml register --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["register", *sys.argv[1:]], prog_name="skinml")
