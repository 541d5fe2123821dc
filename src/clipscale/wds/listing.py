"""What exists next to a list of shards, from one listing per folder: which shards are missing, each
shard's size and version (the key of a cached count), and which index and img2dataset stats files
lie beside them - so that none of it costs a request per shard.

A remote folder is listed once (a LIST request per 1,000 objects: 140 for DataComp-1B's 139,828
shards), a local folder read once (one `scandir`); a local shard's size and modification time
are asked for only where a count must be validated against a cache. Web servers (http, https)
are not listed: most cannot be, and a HEAD per shard costs as much as the count it would save.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlparse

from .remote import filesystem, is_remote, object_version, with_retries
from .urls import local_path

STATS_SUFFIX = "_stats.json"  # img2dataset writes NNNNN_stats.json beside NNNNN.tar


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing says of one object: enough to tell whether it changed since it was counted."""

    size: int | None
    version: str | None

    def key(self) -> list:
        return [self.size, self.version]


# A web server cannot be listed: a count of one of its shards is cached by URL alone (a replaced
# shard is found out when it is read).
WEB_INFO = ObjectInfo(None, "web")


def _local_info(path: str) -> ObjectInfo | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return ObjectInfo(st.st_size, str(st.st_mtime_ns))


def stats_name(shard: str) -> str | None:
    """img2dataset's stats file of a shard (its name or its URL), None for a name not ending in .tar."""
    return shard[: -len(".tar")] + STATS_SUFFIX if shard.endswith(".tar") else None


class Folder:
    """One folder's listing: names, and for remote folders each object's size and version."""

    def __init__(self, url: str, names: set[str] | None, infos: dict[str, ObjectInfo], local: bool):
        self.url, self.names, self.infos, self.local = url, names, infos, local

    @property
    def listed(self) -> bool:
        return self.names is not None

    def has(self, name: str) -> bool | None:
        """Whether the listing shows `name` (None: the folder could not be listed)."""
        return None if self.names is None else name in self.names


def list_folder(folder: str) -> Folder:
    """The listing of a local path's or remote URL's folder (an unlistable one has `names` None)."""
    if not is_remote(folder):
        try:
            with os.scandir(folder or ".") as entries:
                return Folder(folder, {e.name for e in entries}, {}, local=True)
        except OSError:
            return Folder(folder, None, {}, local=True)
    if urlparse(folder).scheme in ("http", "https"):
        return Folder(folder, None, {}, local=False)
    fs, path = filesystem(folder)
    try:
        entries = with_retries(f"listing {folder}", lambda: fs.ls(path, detail=True, refresh=True))
    except (FileNotFoundError, NotADirectoryError):
        return Folder(folder, set(), {}, local=False)  # no such folder: nothing in it exists
    except PermissionError:  # e.g. GetObject without ListBucket: existence is left to the counting
        return Folder(folder, None, {}, local=False)
    infos = {}
    for entry in entries:
        if entry.get("type", "file") == "file":
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            infos[name] = ObjectInfo(
                int(entry["size"]) if entry.get("size") is not None else None, object_version(entry)
            )
    return Folder(folder, set(infos), infos, local=False)


def split_url(url: str) -> tuple[str, str, str | None]:
    """(folder, file name, local path or None) of a shard URL."""
    path = local_path(url)
    if path is not None:
        folder, name = os.path.split(path)
        return folder or ".", name, path
    folder, _, name = url.rpartition("/")
    return folder, name, None


class ShardListing:
    """The folders of `urls`, each listed once (`pipe:` URLs are taken on trust)."""

    @staticmethod
    def is_local(url: str) -> bool:
        return local_path(url) is not None

    def __init__(self, urls: list[str]):
        self.urls = urls
        self.local_infos: dict[str, ObjectInfo | None] = {}
        self.folders: dict[str, Folder] = {}
        for url in urls:
            if url.startswith("pipe:") or url == "-":
                continue
            folder, _, _ = split_url(url)
            if folder not in self.folders:
                self.folders[folder] = list_folder(folder)

    def folder_of(self, url: str) -> tuple[Folder | None, str, str | None]:
        folder, name, path = split_url(url)
        return self.folders.get(folder), name, path

    def exists(self, url: str) -> bool:
        folder, name, path = self.folder_of(url)
        if folder is None:
            return True  # pipe: and stdin: reading will tell
        listed = folder.has(name)
        if listed:
            return True
        if path is not None:  # not in the listing (a case-folding file system, an unlistable folder)
            return os.path.isfile(path)
        # a folder that cannot be listed (a web server, a bucket without list permission): not a
        # request per shard here; counting (all ranks, in parallel) or reading says what is missing
        return listed is None

    def missing(self) -> list[str]:
        return [u for u in self.urls if not self.exists(u)]

    def info(self, url: str) -> ObjectInfo | None:
        """Size and version of a shard (a local file is asked for them now), None if unknown."""
        folder, name, path = self.folder_of(url)
        if path is not None:
            if path in self.local_infos:
                return self.local_infos[path]
            return _local_info(path)
        if folder is not None and not folder.listed and urlparse(url).scheme in ("http", "https"):
            return WEB_INFO
        return folder.infos.get(name) if folder is not None else None

    def prefetch_local_infos(self, urls: list[str], threads: int = 32) -> None:
        """Stat many local shards at once (a parallel file system answers them in parallel)."""
        paths = [p for p in (local_path(u) for u in urls) if p is not None and p not in self.local_infos]
        if len(paths) < 64:
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stat") as pool:
            self.local_infos.update(zip(paths, pool.map(_local_info, paths)))

    def beside(self, url: str, name: str) -> bool | None:
        """Whether a file `name` lies in the shard's folder (None: the folder was not listed)."""
        folder, _, _ = self.folder_of(url)
        return None if folder is None else folder.has(name)
