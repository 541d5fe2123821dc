"""Shard URLs: local paths, `file:` and `pipe:` URLs, remote schemes, and the file name an index
uses for each."""

from __future__ import annotations

import os
import re
from urllib.parse import urlparse
from urllib.request import url2pathname


def local_path(url: str) -> str | None:
    """The filesystem path of a local shard URL (a path, or a `file:` URL percent-decoded as
    webdataset's gopen does), or None for `pipe:`, `-` (stdin) and remote URLs."""
    if ":" not in url:  # a plain path (no scheme): the common case, without urlparse (231,000 shards)
        return None if url == "-" else url
    if url.startswith("pipe:"):
        return None
    if url.startswith("file:"):
        return url2pathname(re.sub(r"^file:(//)?", "", url))
    if urlparse(url).scheme == "":
        return url
    return None


def shard_name(url: str) -> str:
    """The file name an index uses for this URL (works for `pipe:... s3://b/x-000001.tar -`)."""
    path = local_path(url)
    if path is not None:
        return os.path.basename(path)
    found = re.findall(r"([^/\s'\"]+\.tar(?:\.gz)?)", url)
    return found[-1] if found else url
