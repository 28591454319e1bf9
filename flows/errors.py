"""Exceptions the CLI turns into one-line messages."""


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""
