"""The one error type users see: a message that fits on one line."""


class EdgeRtError(Exception):
    """A problem with the user's input or environment, reported as one line, exit 1."""
