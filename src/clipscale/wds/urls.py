"""Shard URLs: local paths, `file:` and `pipe:` URLs, remote schemes, and the file name an index
uses for each."""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL, or None for pipe:/remote URLs."""
    if url.startswith("pipe:"):
        return None
    parsed = urlparse(url)
    if parsed.scheme == "":
        return url
    if parsed.scheme == "file":
        return parsed.path
    return None


def shard_name(url: str) -> str:
    """The file name an index uses for this URL (works for `pipe:... s3://b/x-000001.tar -`)."""
    path = local_path(url)
    if path is not None:
        return os.path.basename(path)
    found = re.findall(r"([^/\s'\"]+\.tar(?:\.gz)?)", url)
    return found[-1] if found else url
