"""The exception types a user sees as a single line (no traceback) and an exit code."""


class UserError(Exception):
    """Something the user can fix: a missing dataset, a bad path, an unreachable host.

    The message is one line that says what is wrong and what to do. Tasks turn it into
    `error: <message>` on stderr and `exit_code` (1); anything else is a bug and keeps its traceback.
    """
    exit_code = 1


class StepFailed(UserError):
    """A step that ran elsewhere (on a host, in a job) and failed: its own exit code is passed on."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code if exit_code > 0 else 1
