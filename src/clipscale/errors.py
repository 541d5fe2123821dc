"""User-facing error types, and how a command reports them.

A `UserError` is a mistake in the user's input (config, data, checkpoint). `run_command` prints
its message as one line and exits with its `exit_code` (2; 74 for a checkpoint the storage failed
to read: try again later) instead of showing a traceback.
"""

import logging
import sys
from typing import Callable

EXIT_UNREADABLE = 74  # EX_IOERR: "a checkpoint could not be read: requeue, the same checkpoint is tried again"


class UserError(Exception):
    """A problem the user can fix; printed as one line, never with a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration key, type or value."""


class DataError(UserError):
    """Missing or unreadable training data (shards, manifests)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used (missing, corrupt, or from another model)."""


class CheckpointUnreadable(CheckpointError):
    """A checkpoint that could not be read for a reason outside it (an I/O error, no memory) after
    retries: not damage. It is kept, never skipped for an older one; the job stops to be requeued.
    `step`: the checkpoint's (status.json: supervise counts failures in a row at the same step)."""

    exit_code = EXIT_UNREADABLE

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step


class CheckpointMismatch(CheckpointError):
    """A readable checkpoint of another model or setting (resuming an older one would not help)."""


class TrainingDiverged(UserError):
    """The loss stayed non-finite for train.max_nonfinite_steps consecutive steps, or kept spiking."""


def one_line(exn: BaseException) -> str:
    """`Type: first line of the message`: an exception as one line of an error or a status."""
    return f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"


def run_command(command: Callable[[], int]) -> int:
    """The exit code of `command()`; a UserError is one line on stderr and its exit_code, Ctrl-C 130."""
    try:
        return command()
    except UserError as exn:
        logging.shutdown()
        print(f"clipscale: error: {exn}", file=sys.stderr)
        return exn.exit_code
    except KeyboardInterrupt:
        print("clipscale: interrupted", file=sys.stderr)
        return 130
