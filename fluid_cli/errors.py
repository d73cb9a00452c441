"""The one exception type for user mistakes.

Anything a user can cause (a bad recipe, a missing file, a wrong flag) raises `FluidError` with a message that
says what and where. The CLI prints that message on one line and exits with status 2; programming errors keep
their tracebacks.
"""


class FluidError(Exception):
    """A user-facing error: its message is printed as is, without a traceback."""


def first_line(e: BaseException) -> str:
    """The first line of a library's error message, for a one-line error (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class BadRow(Exception):
    """A data row that cannot be used; its message names the problem (the caller adds where the row is)."""
