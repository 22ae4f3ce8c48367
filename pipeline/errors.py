"""Errors a user can cause (bad YAML, bad path, bad image).

The CLI prints them as one line and exits with status 2; anything else is a bug and raises.
"""


class UserError(Exception):
    """A problem with the user's input; its message is the whole explanation."""


class ConfigError(UserError):
    """An invalid key, value or path in the configuration; the message names the field path."""


class DataError(UserError):
    """A dataset problem (missing folder, unreadable image); the message names the file."""


class Stopped(UserError):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint; exits 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
