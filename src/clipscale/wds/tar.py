"""Raw samples out of one WebDataset tar, in tar order, without decoding anything (no torch).

Opening: local paths, `file:` and `pipe:` URLs here; other schemes (http, gs, ...) through
webdataset's `gopen` (imported only then: importing webdataset imports torch). Reading the
members (`tar_members`): Python's `tarfile` costs ~0.1 ms a sample in the data workers (as much
as a drafted JPEG decode), a header parser for what shard writers produce (ustar, GNU long
names, pax) ~0.015 ms; compressed tars go through `tarfile`. Grouping members into samples
(`group_samples`) follows webdataset's `group_by_keys`. tests/test_tar_reader.py checks both
against webdataset's own functions on the same archives. What we add on top: errors that end
the shard quietly through a callback instead of killing a worker.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from typing import BinaryIO, Callable, Iterable, Iterator

from .urls import local_path

BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: their size is not data
_ZERO_BLOCK = bytes(BLOCK)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


def _read(stream: BinaryIO, n: int) -> bytes:
    """n bytes, fewer only at the end of the stream (a pipe may return short reads)."""
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 for big values (as tarfile.nti)."""
    if field[:1] in (b"\x80", b"\xff"):
        n = int.from_bytes(field[1:], "big")
        return n - (256 ** (len(field) - 1)) if field[:1] == b"\xff" else n
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _pax_records(data: bytes) -> dict[str, bytes]:
    """`"%d key=value\\n"` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


class _Prepended:
    """A stream with bytes already read put back in front (for tarfile on a pipe)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + _read(self.stream, n - len(out))


def tar_members(stream: BinaryIO) -> Iterator[dict]:
    """`{"fname", "data"}` for every regular file of a tar stream, in order, skipping
    webdataset's metadata files: what `webdataset.tariterators.tar_file_iterator` yields.

    Raises tarfile.ReadError for a stream that is not a tar, is truncated inside a member, or
    has a damaged header.
    """
    header = _read(stream, BLOCK)
    if header.startswith(_COMPRESSED_MAGIC):
        yield from _compressed_members(_Prepended(header, stream))
        return
    if not header:
        raise tarfile.ReadError("empty file")
    offset, global_pax, pax, long_name = 0, {}, {}, None
    while True:
        if len(header) < BLOCK:
            raise tarfile.ReadError(f"truncated header at byte {offset}")
        if header == _ZERO_BLOCK:
            return  # end-of-archive blocks
        try:
            if not _checksum_ok(header, _number(header[148:156])):
                raise ValueError("bad checksum")
            kind = header[156:157]
            size = _number(header[124:136])
        except ValueError as exn:
            raise tarfile.ReadError(
                f"{'not a tar file' if offset == 0 else 'damaged header'} at byte {offset}: {exn}"
            ) from None
        effective = {**global_pax, **pax}
        name = None
        if kind not in (b"x", b"g", b"L", b"K"):
            if any(k.startswith("GNU.sparse") for k in effective) or kind == b"S":
                raise tarfile.ReadError(f"sparse member at byte {offset} is not supported")
            size = int(effective["size"]) if "size" in effective else size
            name = _member_name(header, effective, long_name)
            pax, long_name = {}, None
            if kind == b"\0" and name.endswith(b"/"):
                kind = b"5"  # old-style directory entry
        data_size = 0 if kind in _NO_DATA else size
        data = _read(stream, data_size)
        if len(data) < data_size:
            raise tarfile.ReadError(f"unexpected end of data in the member at byte {offset}")
        padding = -data_size % BLOCK
        _read(stream, padding)  # short only at the end of the stream: the next header read says so
        offset += BLOCK + data_size + padding
        if kind == b"x":
            pax = _pax_records(data)
        elif kind == b"g":
            global_pax.update(_pax_records(data))
        elif kind == b"L":
            long_name = data.split(b"\0", 1)[0]
        elif kind in _REGULAR:
            fname = name.decode("utf-8", "surrogateescape")
            if not _is_meta(fname):
                yield {"fname": fname, "data": data}
        header = _read(stream, BLOCK)
        if not header:
            return  # no end-of-archive blocks: tarfile stops here quietly too


def _checksum_ok(header: bytes, stored: int) -> bool:
    """The header checksum, summed as unsigned bytes or (some old writers) as signed ones."""
    unsigned = 256 + sum(header[:148]) + sum(header[156:])
    return stored == unsigned or stored == unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)


def _member_name(header: bytes, pax: dict[str, bytes], long_name: bytes | None) -> bytes:
    """pax `path`, else a GNU long name, else the ustar prefix + name fields."""
    if "path" in pax:
        return pax["path"]
    if long_name is not None:
        return long_name
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""
    return prefix + b"/" + name if prefix else name


def _is_meta(fname: str) -> bool:
    """webdataset's metadata members (`__key__`-like names), which are not sample files."""
    return ("/" not in fname and fname.startswith("__") and fname.endswith("__")) or bool(_META.match(fname))


def _compressed_members(stream) -> Iterator[dict]:
    with tarfile.open(fileobj=stream, mode="r|*") as archive:
        for info in archive:
            archive.members = []  # streaming: keep no member headers (as webdataset does)
            if not info.isreg() or _is_meta(info.name):
                continue
            data = archive.extractfile(info).read()
            if len(data) < info.size:
                raise tarfile.ReadError(f"unexpected end of data in {info.name}")
            yield {"fname": info.name, "data": data}


_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def group_samples(members: Iterable[dict], url: str) -> Iterator[dict]:
    """Consecutive members with the same key (the path up to the first dot of the file name) make
    one sample `{"__key__", "__url__", ext: bytes}`; extensions are lower-cased. A name without
    an extension is ignored; the same extension twice in one sample raises ValueError."""
    current: dict | None = None
    for member in members:
        match = _KEY_EXT.match(member["fname"])
        if not match:
            continue
        key, ext = match.group(1), match.group(2).lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise ValueError(f"{member['fname']}: duplicate file name in tar file {url}")
        current[ext] = member["data"]
    if current is not None:
        yield current


class _PipeReader:
    """stdout of a `pipe:` command; a failing command is an OSError at the end of its output."""

    OK_STATUS = (0, 141, -13)  # 141 / -SIGPIPE: we closed the pipe before its end on purpose
    END_WAIT_S = 2.0  # how long a command may take to exit after its output ended
    TERM_GRACE_S = 2.0  # how long a pipeline stopped before its end has to exit on SIGTERM before SIGKILL
    # kills the command's group once the reading process is gone (a data worker killed or orphaned
    # mid-read); a parent-death signal would reach only the shell, not the commands it started
    WATCH = (
        "while kill -0 {reader} 2>/dev/null; do sleep 1; done; "
        "kill -TERM -{group} 2>/dev/null && sleep {grace} && kill -KILL -{group} 2>/dev/null"
    )

    def __init__(self, command: str):
        self.command = command
        # its own process group, so that closing early stops the whole pipeline (curl | zcat ...)
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, start_new_session=True)
        self.watcher = subprocess.Popen(
            ["sh", "-c", self.WATCH.format(reader=os.getpid(), group=self.proc.pid, grace=self.TERM_GRACE_S)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read(n)
        if not data and n != 0:
            self.check(wait=True)
        return data

    def read1(self, n: int = -1) -> bytes:
        """What the pipe has now (at least one byte, or the end): a slow command is not a stalled one."""
        data = self.proc.stdout.read1(n)
        if not data and n != 0:
            self.check(wait=True)
        return data

    def check(self, wait: bool = False) -> None:
        """OSError when the command has ended with a failing status. With `wait`, give it END_WAIT_S
        to end (its output ended); one that is still running, e.g. writing into a pipe nobody reads
        after a corrupt member, is not news: close() stops it."""
        try:
            status = self.proc.wait(timeout=self.END_WAIT_S) if wait else self.proc.poll()
        except subprocess.TimeoutExpired:
            return
        if status is not None and status not in self.OK_STATUS:
            raise OSError(f"pipe command exited with status {status}: {self.command}")

    def close(self) -> None:
        if self.proc.poll() is None:
            # closed before its end: SIGTERM the whole pipeline (curl | zcat ...: its own group), give
            # it TERM_GRACE_S to clean up, then SIGKILL whatever is left of the group. The shell is not
            # reaped before that, so the group id cannot have been reused meanwhile.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
                self._wait_unreaped(self.TERM_GRACE_S)
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.stdout.close()
        self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.watcher.pid, signal.SIGKILL)
        self.watcher.wait()

    def _wait_unreaped(self, timeout: float) -> None:
        """Wait up to `timeout` for the shell to exit, leaving it a zombie (its group id stays ours)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
            time.sleep(0.01)


class StalledRead(OSError):
    """A shard stream delivered no bytes for the read timeout (a stuck mount, a hung pipe)."""


class TimeoutReader:
    """A stream read by a background thread in chunks, so that a read that delivers nothing for
    `timeout` seconds raises StalledRead instead of blocking the data worker forever. (A thread
    stuck in a read of a dead mount stays stuck; closing a pipe's stream stops its command.)"""

    CHUNK = 1 << 20

    def __init__(self, stream, timeout: float, url: str):
        self.stream, self.timeout, self.url = stream, timeout, url
        self._chunks: queue.Queue = queue.Queue(maxsize=4)
        self._buffer, self._pos, self._eof = bytearray(), 0, False
        self.stalled: StalledRead | None = None  # set once a read timed out (tarfile may wrap the error)
        self._stop = threading.Event()
        self._read = getattr(stream, "read1", stream.read)
        self._thread = threading.Thread(target=self._pump, name="shard-reader", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stop.is_set():
            try:  # read1: whatever has arrived, so that a slow stream is not taken for a stalled one
                chunk = self._read(self.CHUNK)
            except BaseException as exn:  # noqa: BLE001 - handed to the reading side
                chunk = exn
            while not self._stop.is_set():  # never block for good on a reader that went away
                try:
                    self._chunks.put(chunk, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not isinstance(chunk, bytes) or not chunk:
                return

    def _fill(self) -> bool:
        try:
            chunk = self._chunks.get(timeout=self.timeout)
        except queue.Empty:
            self.stalled = StalledRead(f"no data for {self.timeout:g} s from {self.url}")
            raise self.stalled from None
        if isinstance(chunk, BaseException):
            raise chunk
        if not chunk:
            self._eof = True
            return False
        if self._pos > self.CHUNK:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += chunk
        return True

    def read(self, n: int = -1) -> bytes:
        while (n < 0 or len(self._buffer) - self._pos < n) and not self._eof and self._fill():
            pass
        end = len(self._buffer) if n < 0 else min(len(self._buffer), self._pos + n)
        out = bytes(self._buffer[self._pos : end])
        self._pos = end
        return out

    def check(self, wait: bool = False) -> None:
        if isinstance(self.stream, _PipeReader):
            self.stream.check(wait)

    def close(self) -> None:
        self._stop.set()
        if self.stalled is not None and not isinstance(self.stream, _PipeReader) and self._thread.is_alive():
            return  # the thread is stuck in a read holding the stream's lock: closing would block on it
        self.stream.close()  # a pipe's command is stopped first, which ends the thread's read


def open_url(url: str) -> BinaryIO:
    """A readable binary stream for a shard URL: a local path, `file:`, `pipe:CMD`, or any scheme
    webdataset's gopen knows (http via curl, gs via gsutil, ...)."""
    if url.startswith("pipe:"):
        return _PipeReader(url[len("pipe:") :])
    if url == "-":
        return sys.stdin.buffer
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    from .remote import RangeReader, fsspec_reads

    if fsspec_reads(url):
        return RangeReader(url)
    from webdataset.gopen import gopen  # imports torch: only for schemes fsspec cannot read here

    return gopen(url, "rb")


def iter_raw_samples(
    url: str, on_error: Callable[[Exception], None], read_timeout: float | None = None
) -> Iterator[dict]:
    """Yield `{"__key__", "__url__", ext: bytes, ...}` for each sample of the shard at `url`.

    A truncated or unreadable tar, or (with `read_timeout`) a stream that delivers nothing for that
    many seconds, ends the iteration after calling `on_error(exception)`.
    """
    stream: BinaryIO | None = None
    try:
        stream = open_url(url)
        if read_timeout:
            stream = TimeoutReader(stream, read_timeout, url)
        yield from group_samples(tar_members(stream), url)
    except GeneratorExit:
        raise
    except Exception as exn:  # corrupt tar, missing file, failing pipe: end this shard
        error = getattr(stream, "stalled", None) or exn
        if isinstance(stream, (_PipeReader, TimeoutReader)) and not isinstance(error, StalledRead):
            try:
                stream.check(wait=True)  # a pipe cut off mid-member: the command's failure is the news
            except OSError as failed:
                error = failed
        on_error(error)
    finally:
        if stream is not None:
            # A pipe closed before its end (we needed a prefix) reports SIGPIPE; that is not an error.
            with contextlib.suppress(Exception):
                stream.close()
