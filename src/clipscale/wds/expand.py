"""Shard lists as users have them, to URLs: brace patterns, local and remote globs, list files.

`data.train_shards` (or a source's `shards`) is one or more parts joined with '::'; each part is
- a brace pattern: `/data/cc3m-{000000..000331}.tar`, `s3://b/laion/{00000..23099}.tar`;
- a glob, local or remote: `/data/laion/*.tar`, `/data/{cc12m,yfcc}/*.tar` (braces are expanded
  first), `s3://b/datacomp/**/*.tar` (`**` spans folders); a remote glob is one listing (a LIST
  request per 1,000 objects), never a request per object; the matches are sorted;
- a text file with one URL or pattern per line (`@/data/shards.txt`, or any path ending in `.txt`
  or `.list`; blank lines and lines starting with `#` are ignored), local or remote;
- `pipe:` commands and web URLs (`https://...`), taken as they are.
"""

from __future__ import annotations

import fnmatch
import glob
import os

import braceexpand

from ..errors import DataError
from .remote import expand_remote_glob, filesystem, has_glob, is_remote, with_retries
from .urls import local_path

LIST_SUFFIXES = (".txt", ".list")


def expand(pattern: str, what: str = "data.train_shards") -> list[str]:
    """Every shard URL the shard list names, in order. (Unlike webdataset's expand_urls, `${VAR}` is
    not replaced from the environment: the shell does that already.)"""
    if not pattern or not pattern.strip():
        raise DataError(f"no shards given: set {what} (e.g. /data/cc3m-{{000000..000331}}.tar)")
    urls = []
    for part in pattern.split("::"):
        urls.extend(_expand_part(part.strip(), what, depth=0))
    if not urls:
        raise DataError(f"{what} '{pattern}' expands to no shards")
    return urls


def _expand_part(part: str, what: str, depth: int) -> list[str]:
    if not part:
        return []
    if is_list_file(part):
        return _expand_list_file(part.removeprefix("@"), what, depth)
    out = []
    for url in braceexpand.braceexpand(part):
        url = url.strip()
        if not url:
            continue
        if not url.startswith("pipe:") and not is_remote(url) and not has_glob(url) and os.path.isdir(url):
            out.extend(_folder_shards(url, what))  # a local folder: its shards, as the shard tools take it
        elif url.startswith("pipe:") or not has_glob(url):
            out.append(url)
        elif is_remote(url):
            out.extend(expand_remote_glob(url))
        else:
            out.extend(_expand_local_glob(url, what))
    return out


def _folder_shards(folder: str, what: str) -> list[str]:
    names = sorted(n for n in os.listdir(folder) if n.endswith((".tar", ".tar.gz")))
    if not names:
        raise DataError(f"{what}: the folder {folder} holds no .tar shards")
    return [os.path.join(folder, n) for n in names]


def is_list_file(part: str) -> bool:
    """`@path`, or a path (not a pattern, not a pipe:) ending in .txt/.list: a file listing shards."""
    if part.startswith("@"):
        return True
    return not part.startswith("pipe:") and not has_glob(part) and "{" not in part and part.endswith(LIST_SUFFIXES)


def _expand_list_file(path: str, what: str, depth: int) -> list[str]:
    if depth > 2:
        raise DataError(f"{what}: shard list files nest too deeply at {path}")
    try:
        if is_remote(path):
            fs, inner = filesystem(path)
            text = with_retries(f"reading {path}", lambda: fs.cat_file(inner)).decode("utf-8")
        else:
            with open(local_path(path) or path, encoding="utf-8") as f:
                text = f.read()
    except FileNotFoundError:
        raise DataError(f"{what}: shard list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exn:
        raise DataError(f"{what}: cannot read the shard list file {path}: {exn}") from None
    urls = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            urls.extend(_expand_part(_beside(path, line), what, depth + 1))
    return urls


def _beside(list_file: str, line: str) -> str:
    """A relative path in a list file names a file next to the list (as playlists do), not one in
    the current directory of whichever process reads it."""
    if line.startswith(("pipe:", "@", "/", "~")) or "://" in line or line.startswith("file:"):
        return line
    if is_remote(list_file):
        return f"{list_file.rsplit('/', 1)[0]}/{line}"
    base = os.path.dirname(local_path(list_file) or list_file)
    return os.path.join(base, line) if base else line


def _expand_local_glob(url: str, what: str) -> list[str]:
    path = local_path(url) or url
    folder, name = os.path.split(path)
    if not has_glob(folder):  # the usual /data/laion/*.tar: one scandir, no stat per file
        try:
            with os.scandir(folder or ".") as entries:
                names = [e.name for e in entries if fnmatch.fnmatchcase(e.name, name) and e.is_file()]
            if not name.startswith("."):  # as glob: hidden files (a writer's temporaries) only if asked for
                names = [n for n in names if not n.startswith(".")]
        except OSError:
            names = []
        found = sorted(os.path.join(folder, n) for n in names)
    else:
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not found:
        raise DataError(f"{what}: no file matches {url}")
    return found if path == url else [f"file:{p}" for p in found]
