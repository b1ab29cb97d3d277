"""`llmdrop <verb>`: thin Typer commands over llmdrop.api, one module per group of verbs. Errors are one line on
stderr (traceback with --debug)."""

# isort: off
# the order --help lists the verbs in: each module registers its verbs on `app` when imported
from . import drop, auto, checkpoints, serving, attend, analysis  # noqa: F401
from .common import app

# isort: on

__all__ = ["app"]
