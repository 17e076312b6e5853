"""User-facing errors: one readable line, no traceback, non-zero exit."""


class UserError(Exception):
    """A problem the user can fix: what was wrong, with which file or value, and what to do.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters (a framework's
    errors can run to pages). Defaults to 300."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__
