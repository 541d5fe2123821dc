"""The hang watchdog: a rank that makes no progress for too long leaves its stacks and stops.

A thread watches a progress counter the training loop bumps after every step (nothing is done per
step but storing a number). When the counter has not moved for `train.hang_timeout_s` - a
collective waiting for a rank that died or froze, a data read that never returns, a deadlock - the
rank writes the Python stacks of all its threads (faulthandler) to RUN_DIR/hang/rank<r>-<time>.txt,
marks status.json `hung` (with the step and the ranks that have reported), and exits with
EXIT_HUNG. Every rank watches itself, so every rank that can still run Python reports; the
frozen one cannot, and the others' stacks show the collective they wait in. `clipscale supervise`
requeues a hung run a bounded number of times.

The first step (start-up, compilation, the first data), checkpoint saves and loads, and
evaluations are allowed `train.hang_grace_s` instead: they may legitimately take long.

Outside set-up, `fit()` and shutdown the watchdog is idle: a Trainer built in a notebook or a test,
or one whose `fit()` has returned, must never stop the Python process that holds it minutes later.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

from .status import write_status

EXIT_HUNG = 76  # distinct from EX_TEMPFAIL (75, preempted): "hung: requeue, a bounded number of times"
HANG_DIR = "hang"


class HangWatchdog:
    def __init__(
        self,
        run_dir: Path,
        rank: int,
        timeout_s: float | None,
        grace_s: float,
        status_fields=None,
        poll_s: float | None = None,
    ):
        self.run_dir, self.rank = Path(run_dir), rank
        self.timeout_s, self.grace_s = timeout_s, max(grace_s, timeout_s or 0)
        self.status_fields = status_fields or (lambda: {})
        self.step = 0
        self._last = time.monotonic()
        self._allowance = self.grace_s  # the first step gets the grace period
        self._phase = "first step"
        self._activity = "starting"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if timeout_s:
            self.poll_s = poll_s or min(10.0, max(0.2, timeout_s / 20))
            self._thread = threading.Thread(target=self._watch, name="clipscale-hang-watchdog", daemon=True)
            self._thread.start()

    def doing(self, activity: str) -> None:
        """What the loop is doing now, for the report (a store, no lock: it costs nothing per step).
        C++ collectives (DDP's gradient all-reduce runs inside backward) show no Python frame of
        their own; this names them."""
        self._activity = activity

    @property
    def activity(self) -> str:
        return self._activity

    def watch(self, phase: str) -> None:
        """Start watching (again) from now: `phase` gets the grace period until the next beat."""
        with self._lock:
            self._last, self._allowance, self._phase, self._activity = time.monotonic(), self.grace_s, phase, phase

    def idle(self) -> None:
        """Nothing to watch until the next `watch` (set-up done, or `fit()` returned)."""
        with self._lock:
            self._allowance, self._phase, self._activity = None, "idle", "idle"

    @property
    def watching(self) -> str | None:
        """The phase being watched now (None: idle or stopped)."""
        with self._lock:
            return None if self._allowance is None else self._phase

    def resumed_at(self, step: int) -> None:
        """The step the run resumed from (reports name it); the first step keeps its grace period."""
        with self._lock:
            self.step = step

    def beat(self, step: int) -> None:
        """Progress: a step finished. The next step gets the normal timeout."""
        with self._lock:
            self.step, self._last = step, time.monotonic()
            self._allowance, self._phase = self.timeout_s, "step"

    @contextlib.contextmanager
    def allow(self, phase: str):
        """A stretch that may take long (checkpoint, evaluation): the grace period applies to it."""
        with self._lock:
            before = (self._allowance, self._phase, self._activity)
            self._last, self._allowance, self._phase, self._activity = time.monotonic(), self.grace_s, phase, phase
        try:
            yield
        finally:
            with self._lock:
                self._last = time.monotonic()
                self._allowance, self._phase, self._activity = before

    def stop(self) -> None:
        self._stop.set()
        self.idle()

    # ------------------------------------------------------------------ the thread
    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:  # decided under the lock: an idle() or beat() just now wins
                idle, allowance, phase, step = time.monotonic() - self._last, self._allowance, self._phase, self.step
                fire = bool(allowance) and idle > allowance and not self._stop.is_set()
            if fire:
                self._fire(idle, phase, step)

    def _fire(self, idle: float, phase: str, step: int) -> None:
        headline = (
            f"rank {self.rank} (pid {os.getpid()}): no progress for {idle:.0f} s during {phase} "
            f"after step {step} (allowed {self._allowance or 0:.0f} s)\nin: {self._activity}\n"
        )

        def status(report_folder: Path) -> dict:
            ranks = sorted(
                {
                    int(p.name.split("-")[0][4:])
                    for p in report_folder.glob("rank*-*.txt")
                    if p.stat().st_mtime >= time.time() - 2 * idle
                }
            )
            return dict(
                step=step,
                phase=phase,
                hung_ranks_reported=ranks,
                hang_reports=str(report_folder),
                **self.status_fields(),
            )

        ending = f"rank {self.rank} made no progress for {idle:.0f} s during {phase} after step {step}"
        report_and_exit(self.run_dir, f"rank{self.rank}", headline, "hung", status, ending, EXIT_HUNG)


def report_and_exit(run_dir: Path, name: str, headline: str, state: str, status, ending: str, code: int) -> None:
    """Leave the evidence and exit with `code`, whatever fails on the way (a full disk, a stuck run
    directory: a backstop timer exits even if writing the report blocks): the stacks of every thread
    on stderr and in RUN_DIR/hang/`name`-<time>.txt, then status.json `state` with `status(folder)`'s
    fields."""
    backstop = threading.Timer(60.0, os._exit, args=(code,))
    backstop.daemon = True
    backstop.start()
    report = None
    try:
        print(f"clipscale: {headline}the stacks of every thread:", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        folder = Path(run_dir) / HANG_DIR
        folder.mkdir(parents=True, exist_ok=True)
        report = folder / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        with open(report, "w") as f:
            f.write(f"{headline}the stacks of every thread:\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.flush()
            os.fsync(f.fileno())
        write_status(run_dir, state, **status(folder))
    except BaseException as exn:  # noqa: BLE001 - the exit below must happen
        print(f"clipscale: could not write the report: {type(exn).__name__}: {exn}", file=sys.stderr)
    finally:
        print(f"clipscale: {ending}; stacks in {report or 'the log above'}; exiting with code {code}", flush=True)
        os._exit(code)
