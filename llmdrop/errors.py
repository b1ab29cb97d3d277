"""The one exception type the CLI turns into a single error line."""


class LlmdropError(Exception):
    """A user-facing error: bad input, impossible request, missing optional dependency."""
