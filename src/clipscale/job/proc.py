"""Child processes that end when they should: tied to their parent's life (Linux prctl
PR_SET_PDEATHSIG for data workers, a watching thread for ranks: `exit_when_parent_dies`), and a
helper program run to a deadline (`run_with_deadline`).

The signal is for DataLoader workers: an orphaned worker stuck in a read or ignoring SIGTERM never
reaches torch's own parent check. (`pipe:` shard commands are not covered by it: the signal
reaches only the shell, so wds/tar.py kills their process group through a watcher.) Elsewhere than
Linux it does nothing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _load_prctl():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL(name, use_errno=True).prctl
    return None


_prctl = _load_prctl()  # resolved once, here: the forked child of a threaded process must not dlopen


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """The kernel sends `sig` to this process when the thread that created it exits.

    Safe in a `preexec_fn` (it only calls an already resolved C function)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def exit_when_parent_dies(what: str, poll_s: float = 1.0, code: int = 1) -> threading.Thread:
    """A rank started by a launcher (torchrun, srun's step daemon) must not train on as an orphan
    when the launcher is killed: nobody would stop it, and a requeued job would find it writing into
    the same run folder. A daemon thread notices that this process's parent changed (it was
    reparented to init or a subreaper) within `poll_s` and exits the process at once, saying so.
    (A parent-death signal fires when the *thread* that started the process exits, which a launcher
    that starts workers from a helper thread does while healthy: the parent's pid is what counts.)"""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                say(f"clipscale: {what}: its launcher (pid {parent}) is gone; stopping\n", within_s=1.0)
                os._exit(code)

    thread = threading.Thread(target=watch, name="clipscale-parent-watch", daemon=True)
    thread.start()
    return thread


def say(line: str, within_s: float) -> None:
    """Write `line` to stderr if that takes at most `within_s`: a launcher that died may have left stderr a
    full pipe nobody reads (the write would block forever) or one without a reader (it raises)."""

    def write() -> None:
        with contextlib.suppress(Exception):
            os.write(2, line.encode())

    writer = threading.Thread(target=write, name="clipscale-last-words", daemon=True)
    writer.start()
    writer.join(within_s)


def run_with_deadline(command: list[str], timeout_s: float, output: Path, grace_s: float = 10.0) -> int:
    """Run `command` (a fresh interpreter or program: nothing forked from this threaded process
    runs Python) in a session of its own with the default signal dispositions, its output to
    `output`; at the deadline its whole group gets SIGTERM, `grace_s`, then SIGKILL, and
    TimeoutError is raised. Returns its exit code."""
    with open(output, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait)
                break
        raise TimeoutError(f"{' '.join(command[:4])} ... did not finish within {timeout_s:.0f} s: stopped") from None
    finally:
        if proc.poll() is None:  # interrupted here (KeyboardInterrupt...): never leave it running
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
