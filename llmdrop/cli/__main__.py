"""``python -m llmdrop.cli ...``."""

import sys

from . import app

sys.exit(app(prog_name="llmdrop"))
