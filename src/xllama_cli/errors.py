"""The one exception type for failures a user can fix."""


class XllamaError(Exception):
    """A user-facing failure: the CLI prints `error: <message>` on one line and exits with 2."""
