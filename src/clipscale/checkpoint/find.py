"""Any way a user names a checkpoint -> the checkpoint itself, checked against its checksums.

Accepted, locally and in a bucket (s3://, gs://, ...; the bucket's copy is downloaded first):

    RUN/checkpoints/step_00001000.pt   a step file (DDP)
    RUN/checkpoints/step_00001000      a step folder (FSDP2, DeepSpeed)
    RUN/checkpoints/latest             the pointer: the checkpoint it names
    RUN/checkpoints                    a checkpoints folder: its newest intact checkpoint
    RUN                                a run folder: the same, in RUN/checkpoints
    model.pt                           any other file: returned as it is (an open_clip state_dict)
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from ..errors import CheckpointError
from .files import checksum_problem
from .names import FORMS, LATEST, NAME_RE, checkpoints_folder, is_checkpoint_folder, named_target


def locate(path: str | Path) -> Path:
    """The checkpoint `path` names (see the module docstring), verified; CheckpointError with one line
    naming what was looked for when there is none."""
    from ..wds.remote import is_remote

    if is_remote(str(path)):
        path = download(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: expected {FORMS}")
    if path.is_file() and path.name == LATEST:
        path = named_target(path)
    folder = checkpoints_folder(path)
    if folder is not None:
        found = newest_intact(folder)
        if found is None:
            raise CheckpointError(f"no intact checkpoint in {folder} (looked for {LATEST} and step_* checkpoints)")
        return found
    if path.is_dir() and not is_checkpoint_folder(path):
        raise CheckpointError(f"{path} holds no checkpoint: expected {FORMS}")
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem})")
    return path


def newest_intact(folder: Path) -> Path | None:
    """The checkpoint the folder's `latest` names, else its newest, skipping damaged ones."""
    from .manager import CheckpointManager

    return CheckpointManager.reader(folder).latest()


def download(url: str) -> Path:
    """A checkpoint in a bucket (checkpoint.remote's layout: ROOT/checkpoints/step_N[.pt], ROOT/checkpoints/
    latest) into a per-user local cache; a run or checkpoints folder or `latest` means the newest."""
    from .remote import RemoteMirror

    url = url.rstrip("/")
    head, _, last = url.rpartition("/")
    if NAME_RE.match(last):
        root, name = head.removesuffix("/checkpoints"), last
        mirror = RemoteMirror(root)
    else:
        root = (head if last == LATEST else url).removesuffix("/checkpoints")
        mirror = RemoteMirror(root)
        name = mirror.latest()
        if name is None:
            raise CheckpointError(f"no checkpoint in {root}/checkpoints (no {LATEST} there): expected {FORMS}")
    user_cache = Path(tempfile.gettempdir()) / f"clipscale-checkpoints-{os.getuid()}"  # not shared between users
    cache = user_cache / hashlib.sha1(root.encode()).hexdigest()[:12]
    try:
        return mirror.download(name, cache)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint {name} in {root}/checkpoints") from None
