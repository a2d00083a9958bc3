"""`python -m patchline` is the `patchline` command."""

from patchline.cli import app

app(prog_name="patchline")
