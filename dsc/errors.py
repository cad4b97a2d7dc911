"""Errors a user can act on. The CLI turns ``DscError`` into exit code 2 and prints the message."""


class DscError(Exception):
    """Bad user input: the message says what was wrong and what to do."""


class ConfigError(DscError):
    pass


class CheckpointError(DscError):
    pass
