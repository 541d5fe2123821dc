"""Shards in object stores and on web servers (`s3://`, `gs://`, `https://`, any fsspec protocol).

A shard is read by ranged requests of `CHUNK` bytes. A request that fails (a dropped connection,
a reset, a timeout) is retried with back-off at the same byte offset, so no sample is lost or
read twice (webdataset's gopen restarts a broken `curl` from the beginning or gives up: its
issue 473); after `read_retries` failures in a row the read raises and the rest of the shard is a
counted skip. Credentials and endpoints come from the standard environment (`AWS_ENDPOINT_URL`,
`AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, ...) and from `data.storage_options`, passed to fsspec as is.

The options are set once per process (`configure`): DataLoader workers fork with them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_settings = {"storage_options": {}, "retries": 5, "backoff_s": 0.5}
GLOB_CHARS = "*?["


def configure(storage_options: dict | None = None, retries: int = 5, backoff_s: float = 0.5) -> None:
    """Storage options and retries for every remote read of this process (and its future workers)."""
    _settings.update(storage_options=dict(storage_options or {}), retries=retries, backoff_s=backoff_s)
    _filesystems.clear()


def is_remote(url: str) -> bool:
    """A URL with a scheme fsspec reads (not a local path, `file:` or `pipe:`)."""
    if ":" not in url:  # no scheme: a local path (231,000 of them must not each go through urlparse)
        return False
    scheme = urlparse(url).scheme
    return len(scheme) > 1 and scheme not in ("file", "pipe")


_filesystems: dict = {}


def fsspec_reads(url: str) -> bool:
    """Whether fsspec has a working implementation of the URL's protocol in this environment."""
    if not is_remote(url):
        return False
    from fsspec.registry import get_filesystem_class

    try:
        get_filesystem_class(urlparse(url).scheme)
    except (ImportError, ValueError):
        return False
    return True


def filesystem(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) of a remote URL: one filesystem per protocol, options and process (a
    forked DataLoader or build worker makes its own: s3fs's event loop does not survive a fork).
    `storage_options`: these instead of the data's (checkpoints have their own)."""
    import fsspec

    protocol = urlparse(url).scheme
    options = _settings["storage_options"] if storage_options is None else storage_options
    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str))
    if key not in _filesystems:
        try:
            # not fsspec's instance cache: it would hand back a filesystem made before configure() (or
            # before the environment changed, e.g. AWS_ENDPOINT_URL), with its old endpoint
            _filesystems[key] = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        except ImportError as exn:
            from ..errors import DataError

            extra = {"s3": "s3", "gs": "gcs", "gcs": "gcs"}.get(protocol)
            hint = f": pip install 'clipscale[{extra}]'" if extra else ""
            raise DataError(f"cannot read {protocol}:// URLs ({exn}){hint}") from None
    fs = _filesystems[key]
    return fs, fs._strip_protocol(url)


def with_retries(what: str, call, retries: int | None = None):
    """call() retried with exponential back-off on OSError-like failures; the last one is raised."""
    retries = _settings["retries"] if retries is None else retries
    for attempt in range(retries + 1):
        try:
            return call()
        except (FileNotFoundError, PermissionError, ObjectChanged, TypeError, ValueError, AttributeError):
            raise  # no such object, no access, a replaced object, a wrong storage option: asking again will not help
        except Exception as exn:  # noqa: BLE001 - botocore, aiohttp and OS errors alike
            if attempt == retries:
                raise OSError(f"{what}: failed {retries + 1} times: {type(exn).__name__}: {exn}") from None
            delay = _settings["backoff_s"] * 2**attempt
            log.warning("%s: %s: %s; retrying in %.1f s", what, type(exn).__name__, exn, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class ObjectChanged(OSError):
    """The object was replaced while it was read: the bytes still to come would not continue the
    ones already read, so the rest of the shard is an error (counted), not spliced from two versions."""


def object_version(info: dict) -> str | None:
    """What names this version of an object's bytes in an fsspec `info()`: a version id or GCS's
    generation (an etag there also changes with metadata), else the ETag (S3, HTTP), a checksum,
    the modification time; None where the store says nothing of the kind."""
    keys = ("generation", "VersionId", "version_id", "ETag", "etag", "Content-MD5", "md5Hash", "Digest",
            "LastModified", "Last-Modified", "last_modified", "mtime")  # fmt: skip
    for key in keys:
        if info.get(key) is not None:
            return str(info[key])
    return None


class RangeReader:
    """A read-only stream over a remote object by ranged requests, resuming at the byte offset.

    Every request is pinned to the version whose size was read first, so a shard replaced while it
    is read is never spliced from two versions: on S3 each range asks for that version (its
    VersionId in a versioned bucket, where the old version still reads whole; else `If-Match` its
    ETag); on other stores the version is asked again after each range of an object read in several.
    A replaced object that cannot be read as it was ends the shard with ObjectChanged (counted)."""

    CHUNK = 8 << 20

    def __init__(self, url: str, chunk: int | None = None):
        self.url = url
        self.fs, self.path = filesystem(url)
        self.chunk = chunk or self.CHUNK
        info = with_retries(f"size of {url}", self._info_now)
        self.size, self.version = int(info["size"]), object_version(info)
        self.s3_pin = _s3_pin(self.fs, info)
        self.pos = 0  # offset of the next byte not yet fetched
        self.buffer, self.buffer_pos = b"", 0
        self.resumed = 0  # requests that were retried (a broken connection continued at its offset)

    def _fetch(self) -> bool:
        if self.pos >= self.size:
            return False
        start, end = self.pos, min(self.pos + self.chunk, self.size)
        attempts = []

        def request():
            attempts.append(1)
            if len(attempts) > 1 and self.s3_pin is None:
                self._check_version()
            data = self._get(start, end)
            if len(data) == self.size and end - start != self.size:
                data = data[start:end]  # a server that ignores Range sent the whole object
            if len(data) != end - start:
                raise OSError(f"short read: {len(data)} of {end - start} bytes")
            if self.s3_pin is None and end - start != self.size:
                self._check_version()  # the range came from the version seen first (no splice)
            return data

        self.buffer = with_retries(f"{self.url} at byte {start}", request)
        self.resumed += len(attempts) - 1
        self.buffer_pos, self.pos = 0, end
        return True

    def _get(self, start: int, end: int) -> bytes:
        if self.s3_pin is None:
            return self.fs.cat_file(self.path, start=start, end=end)
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path)
        try:
            return sync(self.fs.loop, _s3_get_range, self.fs, bucket, key, start, end, self.s3_pin)
        except Exception as exn:  # noqa: BLE001 - botocore's ClientError, as s3fs translated it or not
            text = f"{type(exn).__name__}: {exn}".lower()
            if isinstance(exn, FileNotFoundError) or any(c in text for c in ("precondition", "pre-condition", "412")):
                raise ObjectChanged(
                    f"{self.url} was replaced while it was read ({self.version} is gone): "
                    f"the rest of the shard after byte {start} is skipped"
                ) from None
            raise

    def _info_now(self) -> dict:
        """The object's size and version as they are now, not as a listing cached at start-up saw them."""
        self.fs.invalidate_cache(self.path)
        return self.fs.info(self.path)

    def _check_version(self) -> None:
        """The same object as at the first read, or ObjectChanged."""
        if self.version is None:
            return
        try:
            now = object_version(self._info_now())
        except FileNotFoundError as exn:  # fsspec's HTTP info says so for a failed request too: ask again
            raise ConnectionError(f"asking for the version of {self.url} failed: {exn}") from None
        if now is not None and now != self.version:
            raise ObjectChanged(
                f"{self.url} was replaced while it was read (version {self.version} -> {now}): "
                f"the rest of the shard after byte {self.pos} is skipped"
            )

    def read1(self, n: int = -1) -> bytes:
        """What is buffered (fetching the next range when nothing is): at least one byte, or the end."""
        if self.buffer_pos >= len(self.buffer) and not self._fetch():
            return b""
        end = len(self.buffer) if n < 0 else min(len(self.buffer), self.buffer_pos + n)
        out = self.buffer[self.buffer_pos : end]
        self.buffer_pos = end
        return out

    def read(self, n: int = -1) -> bytes:
        parts, wanted = [], n
        while wanted != 0:
            part = self.read1(wanted)
            if not part:
                break
            parts.append(part)
            if wanted > 0:
                wanted -= len(part)
        return b"".join(parts)

    def close(self) -> None:
        self.buffer = b""


def _s3_pin(fs, info: dict) -> dict | None:
    """What pins an S3 GET to the version `info` saw: its VersionId, else If-Match its ETag (None
    for other stores)."""
    if not hasattr(fs, "_call_s3") or not hasattr(fs, "split_path"):
        return None
    if info.get("VersionId") not in (None, "null"):
        return {"VersionId": info["VersionId"]}
    if info.get("ETag"):
        return {"IfMatch": info["ETag"]}
    return None


async def _s3_get_range(fs, bucket: str, key: str, start: int, end: int, pin: dict) -> bytes:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **pin)
    try:
        return await response["Body"].read()
    finally:
        response["Body"].close()


def expand_remote_glob(url: str) -> list[str]:
    """`s3://bucket/prefix/*.tar` -> the matching objects, sorted (one listing)."""
    fs, path = filesystem(url)
    found = with_retries(f"listing {url}", lambda: fs.glob(path, detail=True))
    return [fs.unstrip_protocol(p) for p, info in sorted(found.items()) if info.get("type", "file") == "file"]


def has_glob(url: str) -> bool:
    """A glob pattern (not for web URLs, whose `?` starts a query string)."""
    return urlparse(url).scheme not in ("http", "https") and any(c in url for c in GLOB_CHARS)
