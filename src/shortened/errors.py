"""The one exception type for user mistakes.

The CLI prints a ``ShortenedError`` as a single line and exits with status 2; any other exception is a
bug and keeps its traceback.
"""


class ShortenedError(Exception):
    """A mistake in the user's input (bad path, bad index, unsupported model...)."""
