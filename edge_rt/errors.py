"""The one error type users see: a message that fits on one line."""


class EdgeRtError(Exception):
    """A problem with the user's input or environment, reported as one line, exit 1.
    Text quoted from a file (a chat template's raise_exception, a name) may hold line
    breaks: they become spaces, so the message stays one line whatever the file says."""

    def __init__(self, message: str = ""):
        super().__init__(" ".join(str(message).splitlines()))
