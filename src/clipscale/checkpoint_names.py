"""Names in a checkpoint folder, local or in a bucket: one definition for the manager and the mirror."""

from __future__ import annotations

import re

LATEST = "latest"  # a file holding the name of the newest complete checkpoint
CHECKSUM_SUFFIX = ".sha256"  # next to each checkpoint: the sha256 of every file in it (JSON)
NAME_RE = re.compile(r"^step_(\d{8,})(\.pt)?$")


def checkpoint_name(step: int, suffix: str = ".pt") -> str:
    return f"step_{step:08d}{suffix}"
