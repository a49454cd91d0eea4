"""`python -m skinml ...` runs the `skinml` command."""

from skinml.cli import cli

if __name__ == "__main__":
    cli(prog_name="skinml")
