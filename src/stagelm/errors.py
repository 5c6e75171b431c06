"""Errors a user can fix (bad data, bad config, a checkpoint that does not fit): the command-line entry points
print them as one line and exit with status 2 instead of showing a stack trace."""


class StagelmError(Exception):
    """Base class: something the user can fix, with a message that says what and where."""


class DataError(StagelmError, ValueError):
    """Missing, empty or malformed data (the message names the file and line)."""


class CheckpointError(StagelmError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model (expected vs found)."""


class ConfigError(StagelmError, ValueError):
    """A configuration value that cannot work (the message names the key)."""
