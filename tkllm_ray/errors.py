"""The one exception type a user can cause: its message names the thing and the fix."""


class TkllmError(Exception):
    """A mistake a user can make (bad input, bad config, unknown account). The CLI prints the
    message as one line instead of a traceback."""
