"""The error a command raises to stop with a message for a person, not a traceback."""

from __future__ import annotations


class CommandError(Exception):
    """A failure the user can act on: ``main`` prints the message and exits with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
