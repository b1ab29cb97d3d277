"""llmdrop: find redundant attention / MLP sublayers and blocks in decoder LLMs, drop them, export."""

__version__ = "0.1.0"
