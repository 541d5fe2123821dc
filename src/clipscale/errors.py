"""User-facing error types.

A `UserError` is a mistake in the user's input (config, data, checkpoint). The CLI prints its
message as one line and exits with status 2 instead of showing a traceback.
"""


class UserError(Exception):
    """A problem the user can fix; printed as one line, never with a traceback."""


class ConfigError(UserError):
    """An invalid configuration key, type or value."""


class DataError(UserError):
    """Missing or unreadable training data (shards, manifests)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, corrupt, or from another model)."""
