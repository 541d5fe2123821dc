"""Tie a process's life to its parent's (Linux prctl PR_SET_PDEATHSIG).

Used by DataLoader workers: an orphaned worker stuck in a read or ignoring SIGTERM never reaches
torch's own parent check. (`pipe:` shard commands are not covered by it: the signal reaches only
the shell, so wds/tar.py kills their process group through a watcher.) Elsewhere than Linux it
does nothing."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import signal

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
