"""One stream: raw samples of a plan's stream from a position, then decoded batches.

Each DataLoader worker runs one stream. Every batch carries the stream's position after its
last sample (plus skip counts), so the training process always knows exactly how far every
stream has been consumed, including samples that were skipped as corrupt.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from ..wds.schema import Skip
from ..wds.tar import iter_raw_samples
from .blocks import block_order
from .plan import Item, StreamPlan, StreamPosition, ranges_indices, stable_hash
from .samples import SampleDecoder

log = logging.getLogger(__name__)


class ItemReader:
    """Reads the samples an item includes from its shard, lazily, in tar order."""

    def __init__(self, plan: StreamPlan, item: Item, on_error: Callable[[str, Exception], None]):
        self.url = plan.shard(item).url
        self.seq = item.seq
        self.data_pass = plan.data_pass(item)
        self._wanted = ranges_indices(plan.indices(item))
        self._samples: Iterator | None = None
        self._index = -1
        self._on_error = on_error
        self._failed = False

    def _error(self, exn: Exception) -> None:
        self._failed = True
        self._on_error(self.url, exn)

    def fetch(self) -> dict | None:
        """The next wanted sample, or None when the shard ended early (truncated/unreadable)."""
        want = next(self._wanted)
        if self._samples is None:
            self._samples = iter_raw_samples(self.url, self._error)
        while self._index < want:
            try:
                sample = next(self._samples)
            except StopIteration:
                return None
            self._index += 1
            if self._index == want:
                sample["__index__"] = want
                sample["__seq__"] = self.seq
                sample["__pass__"] = self.data_pass
                return sample
        return None

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()


def iter_stream(
    plan: StreamPlan, stream: int, cursor: int, offset: int, on_error: Callable[[str, Exception], None]
) -> Iterator[tuple[dict | None, int, int]]:
    """(raw sample or None, cursor after, offset after) for every sample of the stream from the
    position (cursor, offset). Blocks before `cursor` are not read at all; the first `offset`
    samples of the current block are read but not yielded (they were consumed before)."""
    for block_start, items in plan.blocks(stream, cursor):
        counts = [plan.item_len(it) for it in items]
        total = sum(counts)
        readers = [ItemReader(plan, it, on_error) for it in items]
        try:
            order = block_order(
                counts,
                plan.block_seed(items),
                plan.shuffle_buffer,
                plan.shuffle,
                lambda i, readers=readers: readers[i].fetch(),
            )
            for consumed, sample in enumerate(order, start=1):
                if consumed <= offset:
                    continue
                if consumed == total:
                    yield sample, block_start + len(items), 0
                else:
                    yield sample, block_start, consumed
        finally:
            for r in readers:
                r.close()
        offset = 0


class StreamDataset(IterableDataset):
    """An infinite stream of batches for one rank; worker i serves stream slot (i + rotation) % W.

    `rotation` makes a resumed DataLoader (whose worker 0 always answers first) continue with
    the slot the interrupted run would have used next.
    """

    def __init__(
        self,
        plan: StreamPlan,
        rank: int,
        workers_per_rank: int,
        positions: dict[int, StreamPosition],
        rotation: int,
        decoder: SampleDecoder,
        tokenizer: Callable,
        batch_size: int,
        seed: int,
        max_errors_logged: int = 5,
    ):
        self.plan = plan
        self.rank = rank
        self.workers = max(1, workers_per_rank)
        self.positions = positions
        self.rotation = rotation
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.max_errors_logged = max_errors_logged

    def stream_id(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * self.workers + (worker + self.rotation) % self.workers

    def __iter__(self):
        stream = self.stream_id()
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # workers decode; the training process owns the cores
        pos = self.positions.get(stream) or StreamPosition()
        skipped = Counter(pos.skipped)
        logged = 0
        # A stream that reads this many samples in a row without a usable one is broken data.
        give_up = max(10_000, 2 * self.plan.total_samples)
        bad_run = 0

        def on_error(url: str, exn: Exception) -> None:
            log.warning("shard %s ended early: %s: %s", url, type(exn).__name__, exn)

        images, texts, keys, passes = [], [], [], []
        for sample, cursor, offset in iter_stream(self.plan, stream, pos.cursor, pos.offset, on_error):
            try:
                if sample is None:
                    raise Skip("unreadable_shard")
                image, text = self.decoder(
                    sample, stable_hash("aug", self.seed, sample["__seq__"], sample["__index__"])
                )
            except Skip as skip:
                skipped[skip.reason] += 1
                bad_run += 1
                if logged < self.max_errors_logged and sample is not None:
                    logged += 1
                    log.warning("skipped sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), skip)
                if bad_run >= give_up:
                    raise DataError(
                        f"stream {stream}: {bad_run} samples in a row were unusable "
                        f"({dict(skipped)}); check data.image_keys / data.caption_key"
                    ) from None
                continue
            bad_run = 0
            images.append(image)
            texts.append(text)
            keys.append(sample["__key__"])
            passes.append(sample["__pass__"])
            if len(images) == self.batch_size:
                yield {
                    "images": self.decoder.collate(images),
                    "texts": self.tokenizer(texts),
                    "keys": keys,
                    "passes": passes,
                    "stream": stream,
                    "position": StreamPosition(cursor, offset, dict(skipped)),
                }
                images, texts, keys, passes = [], [], [], []
