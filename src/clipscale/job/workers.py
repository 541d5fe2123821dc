"""Where worker processes come from (DataLoader and evaluation workers, helper pools): a fork
server, never the trainer itself.

A trainer runs threads (gloo's, the hang watchdog, the lease heartbeat, tqdm's monitor); a process
forked from it holds only the forking thread, and a lock another thread held at that moment stays
held in the child for good: the data-loader worker that never returned from os.fork(). So workers
are made by multiprocessing's fork server, a process that runs one thread and forks on request.

Started the standard way the server is a new interpreter that imports torch and open_clip again
(about 2.5 CPU s per rank). `start_early()`, called by a rank before it starts any thread (before
the process group, the watchdog, any torch op), instead forks the server from the rank itself: it
holds every module the rank has imported, and forking a worker from it costs milliseconds. Anywhere
else (a process that already runs threads, a Python whose fork server this module does not know),
the first worker starts the standard server with the data modules preloaded.

The server holds the stop signals blocked (SLURM signals every process of a job): it outlives them
(so does multiprocessing's resource tracker, started with the same mask), and a worker it forks
starts with them blocked until it chooses what to do with them (preempt.ignore_signals for
DataLoader workers, their defaults for `pool()` workers). It ends when the process that started it
ends (its "alive" pipe closes; an early-forked one also gets SIGKILL).
"""

from __future__ import annotations

import contextlib
import inspect
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
from multiprocessing import connection, forkserver, resource_tracker, util

from .proc import die_with_parent

# what the server blocks: every signal a job's scheduler or user may send to stop or preempt it
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# what the standard server imports once, so that a worker unpickling its dataset imports nothing
PRELOAD = ["__main__", "clipscale.data.stream", "clipscale.evaluate.sets", "open_clip"]
_MAIN_PARAMETERS = ["listener_fd", "alive_r", "preload", "main_path", "sys_path"]  # Python 3.8 to 3.13


def available() -> bool:
    """A fork server exists here (Linux); elsewhere workers use the platform's default (spawn)."""
    return sys.platform.startswith("linux") and "forkserver" in mp.get_all_start_methods()


def context(workers: int) -> str | None:
    """DataLoader(multiprocessing_context=...): the fork server (started now if need be) when there are
    workers, None (no worker processes, or the platform's default) otherwise."""
    if workers <= 0 or not available():
        return None
    ensure_running()
    return "forkserver"


def pool(processes: int):
    """A multiprocessing Pool whose workers come from the fork server and keep the default signal
    dispositions (terminate() and Ctrl-C stop them)."""
    ensure_running()
    return mp.get_context("forkserver").Pool(processes, initializer=_unblock_stop_signals)


def ensure_running() -> None:
    """The fork server, started the standard way unless `start_early` already forked it."""
    if not available():
        return
    mp.set_forkserver_preload(PRELOAD)
    with _stop_signals_blocked():  # inherited by the server (exec keeps the mask)
        forkserver.ensure_running()


def start_early() -> bool:
    """Fork the fork server from this process now, while it runs a single thread; True when done.

    False (nothing done, `ensure_running` starts the standard server when needed) when this process
    already runs threads or a process group, or this Python's fork server is not the one known here."""
    server = forkserver._forkserver
    if not available() or not _known_fork_server(server):
        return False
    if threading.active_count() > 1 or _process_group_started():
        return False
    with server._lock:
        if server._forkserver_pid is not None:
            return True
        listener = socket.socket(socket.AF_UNIX)
        address = connection.arbitrary_address("AF_UNIX")
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            with _stop_signals_blocked():
                pid = os.fork()
                if pid == 0:
                    _serve(listener.fileno(), alive_r, alive_w)  # never returns
        finally:
            os.close(alive_r)
            listener.close()
        server._forkserver_address, server._forkserver_alive_fd, server._forkserver_pid = address, alive_w, pid
    return True


@contextlib.contextmanager
def _stop_signals_blocked():
    """The stop signals blocked in this thread, for what is started meanwhile. multiprocessing's
    resource tracker is started first, inside the block (its own start unblocks SIGINT and SIGTERM
    when done, whatever they were before): the tracker, too, must outlive a job's stop signals."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(listener_fd: int, alive_r: int, alive_w: int) -> None:
    """The forked server's life: multiprocessing's own server loop, then out without running the
    parent's exit handlers or flushing its buffers a second time."""
    code = 0
    try:
        os.close(alive_w)
        die_with_parent(signal.SIGKILL)
        forkserver.main(listener_fd, alive_r, [])
    except SystemExit as exn:  # the loop's normal end: every client closed the alive pipe
        code = exn.code if isinstance(exn.code, int) else 0
    except BaseException:
        code = 1
    finally:
        os._exit(code)


def _known_fork_server(server) -> bool:
    fields = ("_forkserver_address", "_forkserver_alive_fd", "_forkserver_pid", "_lock")
    if not all(hasattr(server, f) for f in fields):
        return False
    return list(inspect.signature(forkserver.main).parameters) == _MAIN_PARAMETERS


def _process_group_started() -> bool:
    torch_dist = sys.modules.get("torch.distributed")
    return bool(torch_dist is not None and torch_dist.is_available() and torch_dist.is_initialized())


def _unblock_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
