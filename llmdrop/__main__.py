"""``python -m llmdrop ...``: the CLI, also as torchrun starts it (``torchrun --nproc-per-node N -m llmdrop ...``)."""

from llmdrop.cli import app

if __name__ == "__main__":
    app(prog_name="llmdrop")
