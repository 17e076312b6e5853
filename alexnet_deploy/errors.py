"""User-facing errors: one readable line, no traceback, non-zero exit."""


class UserError(Exception):
    """A problem the user can fix: what was wrong, with which file or value, and what to do.

    The CLI prints ``error: <message>`` on one line and exits with status 2.
    """
