"""The one error type for user mistakes: a message and a hint, printed on one line by the CLIs."""

from __future__ import annotations


class FeatstoreError(Exception):
    """A problem the user can fix. ``exit_code`` 2 = bad usage, 1 = runtime failure."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        text = self.message.rstrip(".")
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())


class UsageError(FeatstoreError):
    """The command line or its arguments are wrong (exit code 2)."""

    exit_code = 2
