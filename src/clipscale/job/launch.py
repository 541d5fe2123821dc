"""`python -m clipscale.launch [torchrun arguments] -m clipscale.train ...`: torchrun, with one clear
line instead of a traceback when the run stopped the way it was meant to.

- torchrun turns SIGTERM / SIGUSR1 (--signals-to-handle; here every stop signal unless given) into a
  SignalException: it forwards
  the signal to the workers, waits for them (they checkpoint and exit, see preempt.py), and then
  lets the exception end the process with a traceback that reads like a crash. Here: one line,
  and the exit code a shell gives a signalled process (128 + the signal number).
- A worker that exits with EXIT_PREEMPTED (a rank was signalled), EXIT_HUNG (the hang watchdog) or
  a user error's code (a bad setting, a full disk: the rank printed its one line) makes torchrun
  raise ChildFailedError with its failure report. Here: one line, and that exit
  code, so `srun` and `clipscale supervise` see what happened. Any other failure keeps torchrun's
  report (the worker's own traceback is above it).

The workers' status.json says how the run ended in either case.
"""

from __future__ import annotations

import sys

from ..errors import EXIT_UNREADABLE, UserError
from .preempt import EXIT_PREEMPTED
from .watchdog import EXIT_HUNG

MEANING = {
    UserError.exit_code: "stopped with an error: its one line is above",
    EXIT_PREEMPTED: "preempted: checkpointed and stopped",
    EXIT_HUNG: "hung: stacks in RUN_DIR/hang/",
    EXIT_UNREADABLE: "a checkpoint could not be read: kept, tried again when requeued",
}


# torchrun's default leaves out SIGUSR1/SIGUSR2, whose default action kills it: SLURM's
# `--signal=USR1@...` (every process of the job) would orphan the ranks while they checkpoint
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    argv = sys.argv[1:] if argv is None else argv
    if not any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv):
        argv = [f"--signals-to-handle={','.join(STOP_SIGNALS)}", *argv]
    try:
        torchrun(argv)
    except SignalException as exn:
        signal = getattr(exn.sigval, "name", str(exn.sigval))
        say(f"stopped by {signal}; the workers were told to checkpoint and stop (status.json says how they ended)")
        return 128 + int(exn.sigval)
    except ChildFailedError as exn:
        meant = meant_stop(exn.failures)
        if meant is None:
            raise
        rank, code = meant
        say(f"worker rank {rank} exited with code {code} ({MEANING[code]})")
        return code
    return 0


def meant_stop(failures: dict) -> tuple[int, int] | None:
    """(rank, code) of the earliest worker that stopped on purpose, when no worker crashed; the others
    may have been killed by torchrun's shutdown (a negative code: the signal) after it."""
    if any(f.exitcode not in MEANING and f.exitcode >= 0 for f in failures.values()):
        return None
    meant = sorted((f.timestamp, rank, f.exitcode) for rank, f in failures.items() if f.exitcode in MEANING)
    return (meant[0][1], meant[0][2]) if meant else None


def say(line: str) -> None:
    print(f"clipscale launch: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
