"""Checkpoints on disk: atomic files, a `latest` pointer, retention, and auto-resume.

Layout of a run directory:
    checkpoints/step_00001000.pt   one file per saved step (open_clip layout under "state_dict")
    checkpoints/latest             the file name of the newest *complete* checkpoint

A checkpoint is written to a temporary name, fsync'ed, then renamed; `latest` is updated only
after that, so a crash at any moment leaves the previous checkpoint loadable and pointed at.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .distributed import barrier
from .fsutil import atomic_write_bytes, fsync_dir, remove_path
from .errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
NAME_RE = re.compile(r"^step_(\d{8,})(\.pt)?$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def step_of(path: Path) -> int:
    m = NAME_RE.match(path.name)
    return int(m.group(1)) if m else -1


def torch_save_synced(obj, path: Path) -> None:
    """torch.save + fsync: the bytes are on disk before anyone renames the file into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Every RNG of this process, as plain tensors/ints (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save/find/load checkpoints of one run directory. Only the main rank writes."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, is_main: bool = True):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.is_main = is_main
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- writing
    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """Collective: `write(tmp)` on every rank, then the main rank renames tmp into place and
        moves `latest`. A kill at any point leaves the previous checkpoint and pointer intact."""
        name = checkpoint_name(step)
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        if self.is_main:
            remove_path(tmp)
        barrier()
        write(tmp)
        barrier()
        if self.is_main:
            remove_path(final)
            os.replace(tmp, final)
            fsync_dir(self.dir)
            self._set_latest(final.name)
            self._retain()
        barrier()
        return final

    def _set_latest(self, name: str) -> None:
        atomic_write_bytes(self.dir / LATEST, (name + "\n").encode())

    def all_checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if NAME_RE.match(p.name)]
        return sorted(found, key=step_of)

    def _retain(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.all_checkpoints()[: -self.keep_last]:
            try:
                remove_path(old)
            except OSError as e:
                log.warning("could not remove old checkpoint %s: %s", old, e)

    # ---------------------------------------------------------------- finding
    def latest(self) -> Optional[Path]:
        pointer = self.dir / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if name and (self.dir / name).exists():
                return self.dir / name
            log.warning("checkpoints/latest names %r, which does not exist; using the newest file", name)
        found = self.all_checkpoints()
        return found[-1] if found else None

    def resolve(self, resume: str) -> Optional[Path]:
        """`checkpoint.resume` → a path to load, or None to start fresh."""
        if resume in ("", "none", None):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and (path / LATEST).is_file():  # a checkpoints/ folder
            return CheckpointManager(path.parent, is_main=False).latest()
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume: no checkpoint at {resume}")
        return path


def load_checkpoint_file(path: Path) -> dict:
    """Load a clipscale checkpoint file, with a one-line error for unreadable files."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exn).__name__}: "
                              f"{str(exn).splitlines()[0] if str(exn) else ''}") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a clipscale checkpoint (no 'state_dict')")
    return state
