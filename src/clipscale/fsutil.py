"""Crash-safe file writing: temp file, fsync, rename (no torch import, so CLI tools start fast)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: Path, tag: str = "") -> Path:
    """Where `path` is written before its rename: hidden, `.tmp` + tag (`remove_temporaries` finds it)."""
    return path.with_name(f".{path.name}.tmp{tag}")


def remove_temporaries(directory: Path, *name_globs: str) -> None:
    """Delete what a killed writer left of the files named by `name_globs` (their `temp_path`s)."""
    for name_glob in name_globs:
        for stale in Path(directory).glob(f".{name_glob}.tmp*"):
            remove_path(stale)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """`write(f)` into a temporary file, fsync, rename to `path`: `path` holds either its old
    content or all of the new one, never a torn write."""
    path = Path(path)
    tmp = temp_path(path, f"-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`path` holds either its old content or all of `data`, never a torn write."""
    atomic_write(path, lambda f: f.write(data))


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
