"""RUN_DIR/status.json: how a run ended (running | finished | preempted | failed | hung | unreadable).

The trainer writes it; job scripts (through `clipscale supervise` / `clipscale status`) read it
to decide whether to requeue. torch-free so that a batch shell reads it in a blink.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..fsutil import atomic_write_bytes

STATUS_FILE = "status.json"
STATES = ("running", "finished", "preempted", "failed", "hung", "unreadable")  # unreadable: a checkpoint


def write_status(run_dir: Path, state: str, **fields) -> None:
    record = {"state": state, **fields, "time": time.time()}
    atomic_write_bytes(Path(run_dir) / STATUS_FILE, (json.dumps(record, indent=1) + "\n").encode())


def read_status(run_dir: Path, since: float | None = None) -> dict | None:
    """The status record, or None when there is none (or it is unreadable, or older than `since`:
    a record left by an earlier attempt says nothing about the one that just ended)."""
    try:
        record = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("state") not in STATES:
        return None
    if since is not None and float(record.get("time", 0)) < since:
        return None
    return record
