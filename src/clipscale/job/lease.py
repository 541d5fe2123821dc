"""RUN_DIR/lease.json: one job at a time owns a run folder.

Two jobs writing one run folder (a second submission of the same script, a job started while its
orphaned predecessor still ran) interleave checkpoints, metrics and status and both "succeed". The
main rank takes the lease before the run's first write and keeps it fresh from a thread (a small
rewrite every HEARTBEAT_S, no fsync: freshness is all it says); a job that finds a live owner stops
at start with one line naming it. An owner is gone when it is on this host and its pid is dead,
when it is an earlier round of the same torchrun job (--max-restarts), or when its heartbeat has
not moved for STALE_S (watched from here: the clocks of two hosts need not agree); its lease is
then taken over: renamed aside, then ours created with O_EXCL semantics (a hard link), so two
jobs taking over at once cannot both win. The lease is removed when the job ends; a job killed
outright leaves it for the next one to find gone.

torch-free, like the rest of the job's life below the trainer.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ..errors import UserError

LEASE_FILE = "lease.json"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class RunFolderInUse(UserError):
    """Another live job owns the run folder."""


def _me() -> dict:
    env = os.environ
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": env.get("SLURM_JOB_ID") or None,
        "torchrun_run": env.get("TORCHELASTIC_RUN_ID") or None,
        "restart": int(env.get("TORCHELASTIC_RESTART_COUNT") or 0),
        "token": uuid.uuid4().hex,
        "started": time.time(),
        "beat": 0,
        "heartbeat": time.time(),
    }


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # torn or foreign: nobody's, taken over
    return record if isinstance(record, dict) else {}


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True
    return True


def describe(owner: dict) -> str:
    job = f"job {owner['job']}, " if owner.get("job") else ""
    age = time.time() - float(owner.get("heartbeat", 0))
    return f"{job}host {owner.get('host')}, pid {owner.get('pid')}, last heartbeat {age:.0f} s ago"


class RunLease:
    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.path = Path(run_dir) / LEASE_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.me = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None  # who took the lease from us (a job that found us gone while we were stuck)

    # ---------------------------------------------------------------- taking it
    def acquire(self) -> str | None:
        """Own the run folder (RunFolderInUse when a live job does); returns how an earlier owner's
        lease was taken over, or None."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        took_over = None
        for _ in range(20):  # each round loses only to another job that moved at the same moment
            if self._create():
                self._start_heartbeat()
                return took_over
            owner = _read(self.path)
            if owner is None:
                continue  # released meanwhile
            why = self._gone(owner)
            if why is None:
                raise RunFolderInUse(
                    f"run folder {self.path.parent} is in use by another job ({describe(owner)}); wait for it to "
                    f"end or set another run.dir (a lease left by a job that is gone is taken over by itself)"
                )
            if self._move_aside(owner):
                took_over = f"took over the run folder from a job that is gone ({describe(owner)}: {why})"
        raise RunFolderInUse(f"could not take the lease {self.path}: other jobs keep taking it")

    def _create(self) -> bool:
        tmp = self.path.with_name(f".{LEASE_FILE}.{self.me['token']}")
        tmp.write_text(json.dumps(self.me))
        try:
            os.link(tmp, self.path)  # fails if a lease is there: O_EXCL semantics, also on NFS
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _gone(self, owner: dict) -> str | None:
        """Why `owner` no longer runs, or None when it may still."""
        if not owner.get("token"):
            return "unreadable lease"
        if owner.get("host") == self.me["host"] and owner.get("pid") == self.me["pid"]:
            return "an earlier lease of this very process (a Trainer that was not closed)"
        if owner.get("host") == self.me["host"] and not _pid_alive(owner.get("pid")):
            return "its process has ended"
        if self._earlier_round(owner):
            return "an earlier round of this torchrun job"
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:  # its heartbeat, watched from here
            time.sleep(min(1.0, self.stale_s / 10))
            now = _read(self.path)
            if now != owner:
                return None if now and now.get("token") == owner["token"] else "replaced meanwhile"
        return f"no heartbeat for {self.stale_s:.0f} s"

    def _earlier_round(self, owner: dict) -> bool:
        """An earlier restart round (torchrun --max-restarts) of this very job: the same rendezvous id
        (not torchrun's default 'none', and a fixed --rdzv-id may be reused by another submission: the
        same SLURM job too) and a lower restart count."""
        me = self.me
        return bool(
            me["torchrun_run"] not in (None, "none")
            and owner.get("torchrun_run") == me["torchrun_run"]
            and owner.get("job") == me["job"]
            and int(owner.get("restart", -1)) < me["restart"]
        )

    def _move_aside(self, owner: dict) -> bool:
        """Rename the stale lease aside; False when another job did first (or it is not that lease)."""
        aside = self.path.with_name(f".{LEASE_FILE}.stale-{self.me['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if (_read(aside) or {}).get("token") != owner.get("token"):  # took a fresh one: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    # ---------------------------------------------------------------- keeping it
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="clipscale-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                owner = self._owner_now()
                if not owner or owner.get("token") != self.me["token"]:  # the trainer stops at its next step
                    self.lost = describe(owner) if owner else "nobody (the lease file is gone)"
                    return
                self.me["beat"] += 1
                self.me["heartbeat"] = time.time()
                tmp = self.path.with_name(f".{LEASE_FILE}.{self.me['token']}")
                tmp.write_text(json.dumps(self.me))
                os.replace(tmp, self.path)
            except OSError:  # a full or flaky disk: this beat is lost, not the lease (next one in heartbeat_s)
                continue

    def _owner_now(self) -> dict | None:
        """The lease's owner; looked at twice when it is not us (a job that moved our lease aside by
        mistake puts it back within moments: _move_aside)."""
        owner = _read(self.path)
        if not owner or owner.get("token") != self.me["token"]:
            time.sleep(0.2)
            owner = _read(self.path)
        return owner

    def check(self) -> None:
        """RunFolderInUse once another job has taken the run folder: this job must stop writing into it."""
        if self.lost:
            raise RunFolderInUse(
                f"run folder {self.path.parent} was taken over by another job ({self.lost}) while this one "
                f"made no heartbeat for {self.stale_s:.0f} s; stopping without writing more"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (_read(self.path) or {}).get("token") == self.me["token"]:
            self.path.unlink(missing_ok=True)
