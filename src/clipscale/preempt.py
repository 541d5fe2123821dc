"""Preemption signals: the handler only raises a flag; the loop decides, between steps, together.

Exiting inside a collective would leave the other ranks hanging, so a signal (SIGUSR1 and SIGTERM
by default; SIGUSR2 is a common alternative where NCCL claims SIGUSR1) sets a flag. After every
step the flag is OR-ed across ranks with the loss all-reduce; if any rank was signalled, every
rank saves the same checkpoint and the process exits with EXIT_PREEMPTED. The handler also notes
which step was in progress when the signal came (`received_during`): the run stops at the end of
that step, or of the next one when the flag was read just before the signal arrived.
"""

from __future__ import annotations

import signal
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" -- a preempted run resumes with resume=auto


def ignore_signals(signal_names, worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: workers leave preemption to the main process.

    SLURM signals every process of a job (scancel, preemption, time limit), DataLoader workers
    included, and torch makes SIGTERM fatal in them: the dead worker would fail the main process
    before it can checkpoint. Ignoring the signals is safe: workers still stop when the loader
    shuts down (its done event) or when the main process dies (their parent watchdog).
    """
    for name in signal_names:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class PreemptionHandler:
    def __init__(self, signal_names: list[str]):
        self.received: str | None = None
        self.step_in_progress = 0  # kept up to date by the training loop
        self.received_during: int | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_during = self.step_in_progress

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
