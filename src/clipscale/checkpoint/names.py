"""Names in a checkpoint folder, local or in a bucket: one definition for the manager, the mirror, the
formats and every command that takes a checkpoint path."""

from __future__ import annotations

import re
from pathlib import Path

LATEST = "latest"  # a file holding the name of the newest complete checkpoint
CHECKSUM_SUFFIX = ".sha256"  # next to each checkpoint: the sha256 of every file in it (JSON)
NAME_RE = re.compile(r"^step_(\d{8,})(\.pt)?$")


def checkpoint_name(step: int, suffix: str = ".pt") -> str:
    return f"step_{step:08d}{suffix}"


DCP_METADATA = ".metadata"  # in an FSDP2 checkpoint folder (torch.distributed.checkpoint)
DS_TAG = "state"  # the tag DeepSpeed's save_checkpoint writes under, in a DeepSpeed checkpoint folder


FORMS = (
    "a step file or folder (RUN/checkpoints/step_N.pt, RUN/checkpoints/step_N), the pointer "
    "RUN/checkpoints/latest, a checkpoints folder or a run folder"
)


def is_checkpoint_folder(path: Path) -> bool:
    """A folder that is one checkpoint (FSDP2's DCP shards or DeepSpeed's), not a folder of them."""
    return (path / DCP_METADATA).is_file() or (path / DS_TAG).is_dir()


def checkpoints_folder(path: Path) -> Path | None:
    """The folder of step checkpoints `path` stands for (a run folder, a checkpoints folder, or the
    `latest` pointer), or None when `path` is one checkpoint."""
    if path.is_file():
        return path.parent if path.name == LATEST else None
    if is_checkpoint_folder(path):
        return None
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.name == "checkpoints" or (path / LATEST).is_file() or any(NAME_RE.match(p.name) for p in path.iterdir()):
        return path
    return None


def named_target(pointer: Path) -> Path:
    """The checkpoint a `latest` pointer names; CheckpointError when it names none that is there (a
    user who names the pointer means that checkpoint, not whichever is newest)."""
    from ..errors import CheckpointError

    with open(pointer, "rb") as f:
        name = f.read(256).decode(errors="replace").strip()
    target = pointer.parent / name
    if not NAME_RE.match(name) or not target.exists():
        raise CheckpointError(f"{pointer} names {name[:80]!r}, which is not a checkpoint in {pointer.parent}")
    return target
