"""A real S3-compatible server for the tests (moto's, on 127.0.0.1) and a TCP proxy in front of it
that cuts connections in the middle of a response."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from collections import Counter
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's ThreadedMotoServer; `env` points boto/s3fs at it (AWS_ENDPOINT_URL), no config needed."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}
        os.environ.update(self.env)  # this process's s3fs too
        self.log = RequestLog()

    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request the server answered so far, from its own log."""
        return list(self.log.seen)

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, region_name="us-east-1")

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                s3.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def stop(self):
        self.server.stop()
        self.log.close()


class RequestLog(logging.Handler):
    """The moto server's access log (werkzeug's, one line per request answered, from whichever
    process sent it), kept as (method, path)."""

    LINE = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+"')

    def __init__(self):
        super().__init__(logging.INFO)
        self.seen: list[tuple[str, str]] = []
        self.logger = logging.getLogger("werkzeug")
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)

    def emit(self, record):
        m = self.LINE.search(record.getMessage())
        if m:
            self.seen.append((m.group(1), m.group(2)))

    def count(self, method: str, pattern: str) -> Counter:
        """How many times each path matching `pattern` (a regex) was asked with `method`."""
        return Counter(p for m, p in self.seen if m == method and re.search(pattern, p))

    def close(self):
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)
        super().close()


class CuttingProxy:
    """Forwards 127.0.0.1:port to the server; the first `cuts` connections whose response passes
    `cut_after` bytes are closed right there (a dropped connection mid-shard)."""

    def __init__(self, upstream_port: int, cut_after: int, cuts: int):
        self.upstream_port, self.cut_after, self.cuts_left = upstream_port, cut_after, cuts
        self.cut = 0
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src, dst, response: bool):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if response:
                    with self.lock:
                        cut = self.cuts_left > 0 and sent + len(data) > self.cut_after
                        if cut:
                            self.cuts_left -= 1
                            self.cut += 1
                    if cut:
                        dst.sendall(data[: max(0, self.cut_after - sent)])
                        break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.listener.close()
