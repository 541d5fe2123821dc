"""A checkpoint's files: written durably, checksummed, verified, read back with one-line errors.

A checkpoint is a file (DDP) or a folder (FSDP2, DeepSpeed); next to it, `NAME.sha256` holds the
sha256 of every file in it (JSON), written before the checkpoint is renamed into place."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointUnreadable, one_line
from ..fsutil import fsync_dir, sha256_file
from .names import CHECKSUM_SUFFIX, NAME_RE

# A read that failed for a reason outside the checkpoint (the storage, the machine): not damage.
READ_FAILURES = (OSError, MemoryError)


def read_error(path: Path, exn: BaseException, what: str = "") -> CheckpointError:
    """The one-line error of a failed read of `path`: CheckpointUnreadable when the storage or the
    machine failed (try again later; never skip the checkpoint for it), CheckpointError otherwise."""
    text = f"cannot read {what}{path}: {one_line(exn)}"
    return CheckpointUnreadable(text) if is_read_failure(exn) else CheckpointError(text)


def is_read_failure(exn: BaseException) -> bool:
    """An error of the storage or the machine (retry later), not of the checkpoint: a file that is
    not there (or not a file) is the checkpoint's own damage."""
    return isinstance(exn, READ_FAILURES) and not isinstance(exn, (FileNotFoundError, NotADirectoryError))


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


def checksum_problem(checkpoint: Path, exact: bool = False, sums: Path | None = None) -> str | None:
    """Why `checkpoint` is damaged, or None if it matches its recorded checksums (or has none).
    `exact` (a download from a bucket): a file the checksums do not list is damage too (a stale
    object of an earlier upload); locally it is not (zero_to_fp32.py run in place, NFS's .nfs files).
    `sums`: the checksum file, where it is not beside the checkpoint under its name."""
    sums = sums or checksum_path(checkpoint)
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
    extra = sorted(set(actual) - set(expected)) if exact else []
    if extra:  # e.g. a stale object of an earlier upload of the same step: not what was saved
        return f"unexpected file {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    return None


# Per-rank files carry their writer's rank in their name: DCP's `__R_I.distcp`, DeepSpeed's
# `*zero_pp_rank_R_*`. A file without one (metadata, DeepSpeed's model states, our train state,
# ds_config.json) is the main rank's.
RANK_IN_NAME = (re.compile(r"^__(\d+)_\d+\.distcp$"), re.compile(r"zero_pp_rank_(\d+)_"))


def writer_rank(name: str) -> int:
    for pattern in RANK_IN_NAME:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    return 0


def durability_shares(folder: Path, world: int, files_synced: bool = False) -> list[list[str]]:
    """Main rank, once per save: what each rank must fsync in the checkpoint folder it helped write:
    the files it wrote (none when the writer fsynced them itself, as DCP does), and for the main rank
    every directory (each made once). Total: files + directories, O(world), not world x files."""
    shares: list[list[str]] = [[] for _ in range(world)]
    directories = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            directories.append(path)
        elif not files_synced:
            shares[min(writer_rank(path.name), world - 1)].append(str(path.relative_to(folder)))
    # directories after the files in them, deepest first: a rename's entry is durable up the tree
    shares[0] += [str(d.relative_to(folder)) for d in sorted(directories, key=lambda d: -len(d.parts))]
    return shares


def fsync_paths(folder: Path, relative: list[str]) -> None:
    """fsync each of `relative` under `folder` (files and directories)."""
    for rel in relative:
        path = folder / rel
        if path.is_dir():
            fsync_dir(path)
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint_file(path: Path, mmap: bool = False) -> dict:
    """Load a clipscale checkpoint file, with a one-line error for unreadable files (`mmap`: tensors
    stay in the file until touched)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exn:
        raise read_error(path, exn, "checkpoint ") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a clipscale checkpoint (no 'state_dict')")
    return state
