"""A checkpoint's files: written durably, checksummed, verified, read back with one-line errors.

A checkpoint is a file (DDP) or a folder (FSDP2, DeepSpeed); next to it, `NAME.sha256` holds the
sha256 of every file in it (JSON), written before the checkpoint is renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fsutil import fsync_dir, sha256_file
from .names import CHECKSUM_SUFFIX, NAME_RE


def step_of(path: Path) -> int:
    m = NAME_RE.match(path.name)
    return int(m.group(1)) if m else -1


def torch_save_synced(obj, path: Path) -> None:
    """torch.save + fsync: the bytes are on disk before anyone renames the file into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def checksums(path: Path) -> dict[str, str]:
    """sha256 of a checkpoint file ({"": hash}) or of every file of a checkpoint folder."""
    if path.is_file():
        return {"": sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def checksum_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + CHECKSUM_SUFFIX)


def checksum_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` is damaged, or None if it matches its recorded checksums (or has none)."""
    sums = checksum_path(checkpoint)
    if not sums.is_file():
        return None
    try:
        expected = json.loads(sums.read_text())
    except ValueError:
        return f"unreadable checksum file {sums.name}"
    actual = checksums(checkpoint) if checkpoint.exists() else {}
    for rel, digest in expected.items():
        if actual.get(rel) != digest:
            return f"sha256 mismatch ({rel or checkpoint.name})" if rel in actual else f"missing file {rel}"
    return None


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (files another library wrote)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def load_checkpoint_file(path: Path, mmap: bool = False) -> dict:
    """Load a clipscale checkpoint file, with a one-line error for unreadable files (`mmap`: tensors
    stay in the file until touched)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exn:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a clipscale checkpoint (no 'state_dict')")
    return state
