"""Preemption signals: the handler only raises a flag; the loop decides, between steps, together.

Exiting inside a collective would leave the other ranks hanging, so a signal (SIGUSR1 and SIGTERM
by default; SIGUSR2 is a common alternative where NCCL claims SIGUSR1) sets a flag. After every
step the flag is OR-ed across ranks with the loss all-reduce; if any rank was signalled, every
rank saves the same checkpoint and the process exits with EXIT_PREEMPTED. The handler also notes
which step was in progress when the signal came (`received_during`): the run stops at the end of
that step, or of the next one when the flag was read just before the signal arrived.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from .proc import die_with_parent
from .workers import STOP_SIGNALS

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- a preempted run resumes with resume=auto


def ignore_signals(signal_names, worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers leave preemption to the main process.

    SLURM signals every process of a job (scancel, preemption, time limit), DataLoader workers
    included, and torch makes SIGTERM fatal in them: the dead worker would fail the main process
    before it can checkpoint. Ignoring the signals is safe: workers still stop when the loader
    shuts down (its done event), and when their parent (the fork server, job.workers) dies with the
    main process the kernel kills them (`exit_with_parent`). They start with every stop signal
    blocked (the fork server's mask), so one that arrives before this function runs waits, and is
    ignored here, instead of killing them.
    They are caught by a handler that does nothing rather than set to SIG_IGN: a caught signal is
    reset to its default by exec, an ignored one is not, and the `pipe:` commands a worker starts
    must still stop on SIGTERM.
    """
    exit_with_parent()
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)  # inherited from the rank: a worker's signals are not the rank's news
    for name in signal_names:
        signal.signal(getattr(signal, name), _do_nothing)
    # the fork server blocks every stop signal: the named ones now do nothing, the others their default
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {*STOP_SIGNALS, *(getattr(signal, name) for name in signal_names)})


def _do_nothing(signum, frame) -> None:
    """A worker's preemption signals: the main process acts on them."""


def exit_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (see proc.die_with_parent)."""
    parent = os.getppid()
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


@contextlib.contextmanager
def signals_blocked(signal_names):
    """Block the signals in this thread for the duration (they stay pending, delivered afterwards).

    Processes forked meanwhile inherit the blocked mask: a signal sent to them before they install
    their own disposition waits instead of running the default action (termination)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [getattr(signal, name) for name in signal_names]
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class PreemptionHandler:
    """The preemption signals of a rank. Python runs a signal handler in the main thread, between
    bytecodes: a main thread stuck in C (a hung read, a collective waiting for a frozen rank) never
    runs it. So the C-level handler also writes the signal to a pipe (signal.set_wakeup_fd), read by
    a thread: when the main thread has not taken the signal `grace_s` later, the thread writes the
    stacks (RUN_DIR/hang/preempted-rank<r>-<time>.txt), status.json `preempted` and exits with
    EXIT_PREEMPTED, no checkpoint (the requeued job resumes from the last one). `stuck(name, waited_s)`
    decides and acts, every `grace_s`; it returns False to wait on (a checkpoint being written: the
    ranks wait in C for the main rank for good reason)."""

    def __init__(self, signal_names: list[str], grace_s: float | None = None, stuck=None):
        self.received: str | None = None
        self.step_in_progress = 0  # kept up to date by the training loop
        self.received_during: int | None = None
        self._previous = {}
        self._taken = threading.Event()
        self._wakeup = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)
        if grace_s is not None and signal_names:
            self._watch({getattr(signal, n) for n in signal_names}, grace_s, stuck)

    def _handle(self, signum, frame) -> None:
        self._taken.set()
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_during = self.step_in_progress

    def _watch(self, signals: set[int], grace_s: float, stuck) -> None:
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._wakeup = (read_end, write_end, previous)

        def watch() -> None:
            try:
                while True:
                    data = os.read(read_end, 64)
                    if not data or 0 in data:
                        return  # restore()'s sentinel
                    arrived = [s for s in data if s in signals]
                    waited = 0.0
                    while arrived and stuck is not None and not self._taken.wait(grace_s):
                        waited += grace_s
                        if stuck(signal.Signals(arrived[0]).name, waited):
                            break  # (it exits the process) - else the main thread may be in C for good reason
            finally:
                os.close(read_end)

        threading.Thread(target=watch, name="clipscale-preempt-watch", daemon=True).start()

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        if self._wakeup is not None:
            read_end, write_end, previous = self._wakeup
            self._wakeup = None
            signal.set_wakeup_fd(previous)
            with contextlib.suppress(OSError):
                os.write(write_end, b"\0")  # the watching thread ends
            os.close(write_end)
