"""MLproject entry point `split`: see `skinml split --help`."""

import sys

from skinml.cli import cli

if __name__ == "__main__":
    cli(["split", *sys.argv[1:]], prog_name="skinml")
