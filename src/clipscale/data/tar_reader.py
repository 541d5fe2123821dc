"""Raw samples out of one WebDataset tar, in tar order, without decoding anything.

Opening (local path, file:, pipe:, http...) is webdataset's `gopen`; member iteration and
grouping by key are webdataset's `tar_file_iterator` / `group_by_keys`. What we add: a
sample index (the ordinal of the sample inside its shard, the unit of exact resume), and
errors that end the shard quietly through a callback instead of killing a worker.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator


def _reraise(exn: Exception) -> bool:
    raise exn


def iter_raw_samples(url: str, on_error: Callable[[Exception], None]) -> Iterator[dict]:
    """Yield `{"__key__", "__url__", ext: bytes, ...}` for each sample of the shard at `url`.

    A truncated or unreadable tar ends the iteration after calling `on_error(exception)`.
    """
    stream = None
    try:
        stream = gopen(url, "rb")

        def files():
            for f in tar_file_iterator(stream, handler=_reraise):
                f["__url__"] = url
                yield f

        yield from group_by_keys(files(), handler=_reraise)
    except GeneratorExit:
        raise
    except Exception as exn:  # corrupt tar, missing file, failing pipe: end this shard
        on_error(exn)
    finally:
        if stream is not None:
            # A pipe closed before its end (we needed a prefix) reports SIGPIPE; that is not an error.
            with contextlib.suppress(Exception):
                stream.close()
