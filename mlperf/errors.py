"""The one exception type a user sees as a single line (no traceback) with exit code 1."""


class UserError(Exception):
    """Something the user can fix: a missing dataset, a bad path, an unreachable host.

    The message is one line that says what is wrong and what to do. Tasks turn it into
    `error: <message>` on stderr and exit code 1; anything else is a bug and keeps its traceback.
    """
