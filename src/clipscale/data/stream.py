"""One stream: the samples a (rank, worker) stream reads from every source, and its batches.

Each DataLoader worker runs one stream. For each of its micro-batches the mixture schedule says
how many samples of each source it holds; the stream pulls that many usable samples from each
source's plan (a corrupt one is skipped, counted, and replaced by the source's next sample). Every
batch carries, per source, the stream's position after its last sample (plus skip counts), so
the training process always knows exactly how far every stream has read every source.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from ..wds.remote import configure as configure_storage
from ..wds.schema import Skip
from ..wds.tar import iter_raw_samples
from .mixture import MixtureSchedule
from .plan import Item, StreamPlan, StreamPosition, stable_hash
from .samples import SampleDecoder

log = logging.getLogger(__name__)


class ItemReader:
    """Reads the samples an item includes from its shard, lazily, in tar order."""

    def __init__(
        self,
        plan: StreamPlan,
        data_pass: int,
        item: Item,
        on_error: Callable[[str, Exception], None],
        read_timeout: float | None = None,
    ):
        self.url = plan.shards[item.shard].url
        self.shard, self.data_pass = item.shard, data_pass
        self._wanted = item.indices()
        self._next = 0  # position in _wanted
        self._index = -1  # index of the last sample read from the tar
        self._samples: Iterator | None = None
        self._on_error = on_error
        self._read_timeout = read_timeout

    def next(self, keep: bool = True) -> dict | None:
        """The next wanted sample (None when the shard ended early: truncated or unreadable)."""
        want = int(self._wanted[self._next])
        self._next += 1
        if self._samples is None:
            self._samples = iter_raw_samples(self.url, lambda exn: self._on_error(self.url, exn), self._read_timeout)
        while self._index < want:
            try:
                sample = next(self._samples)
            except StopIteration:
                return None
            self._index += 1
        if self._index != want:
            return None
        if keep:
            sample.update(__index__=want, __shard__=self.shard, __pass__=self.data_pass)
            return sample
        return None

    def close(self) -> None:
        if self._samples is not None:
            self._samples.close()


def _after_block(plan: StreamPlan, stream: int, segment: int, block: int) -> StreamPosition:
    """The position right after block `block` of `segment` (the next block, or the next segment)."""
    _, blocks = plan.blocks(stream, segment)
    return StreamPosition(segment, block + 1, 0) if block + 1 < len(blocks) else StreamPosition(segment + 1, 0, 0)


def iter_source(
    plan: StreamPlan,
    stream: int,
    start: StreamPosition,
    on_error: Callable[[str, Exception], None],
    read_timeout: float | None = None,
) -> Iterator[tuple[dict | None, StreamPosition]]:
    """(raw sample or None, position after it) for every sample of the stream's plan from `start`.

    Blocks before the position are not opened; the samples of the current block that were
    consumed before are read past (the tar is a stream) but not yielded."""
    segment, block, offset = start.segment, start.block, start.offset
    while True:
        seg, blocks = plan.blocks(stream, segment)
        for b in range(block, len(blocks)):
            order = plan.block_order(stream, segment, b)
            readers = [ItemReader(plan, seg.data_pass, item, on_error, read_timeout) for item in blocks[b]]
            try:
                first_chunk, skip = divmod(offset, order.buffer)
                for r in range(first_chunk * order.buffer):
                    readers[order.items[r]].next(keep=False)
                for chunk in range(first_chunk, order.num_chunks):
                    lo, hi = order.chunk_reads(chunk)
                    got = [readers[i].next() for i in order.items[lo:hi]]
                    perm = order.permutation(chunk)
                    for k in range(skip if chunk == first_chunk else 0, hi - lo):
                        done = lo + k + 1
                        after = (
                            StreamPosition(segment, b, done)
                            if done < order.n
                            else _after_block(plan, stream, segment, b)
                        )
                        yield got[perm[k]], after
            finally:
                for reader in readers:
                    reader.close()
            offset = 0
        segment, block = segment + 1, 0


class SourceStream:
    """Usable samples of one source for one stream: decoded, skips counted, a give-up guard."""

    def __init__(
        self,
        name: str,
        plan: StreamPlan,
        stream: int,
        start: StreamPosition,
        decoder: SampleDecoder,
        seed: int,
        max_errors_logged: int,
        read_timeout: float | None = None,
    ):
        self.name, self.plan, self.stream, self.decoder, self.seed = name, plan, stream, decoder, seed
        self.position = start
        self.skipped = Counter(start.skipped)
        self.logged, self.max_errors_logged = 0, max_errors_logged
        self._samples = iter_source(plan, stream, start, self._on_error, read_timeout)
        # a stream that reads this much without one usable sample has broken data (or settings)
        self.give_up_samples = max(10_000, 2 * plan.total_samples // plan.num_streams)
        self.give_up_blocks = 2 * len(plan.blocks(stream, len(plan.leftovers[stream]))[1]) + 10

    def _on_error(self, url: str, exn: Exception) -> None:
        log.warning("shard %s ended early: %s: %s", url, type(exn).__name__, exn)

    def take(self, n: int) -> list[tuple]:
        """n usable samples: (image, caption, key, data pass, stored teacher features or None)."""
        out = []
        bad_samples = bad_blocks = 0
        while len(out) < n:
            sample, after = next(self._samples)
            if after.block != self.position.block or after.segment != self.position.segment:
                bad_blocks += 1
            self.position = after
            try:
                if sample is None:
                    raise Skip("unreadable_shard")
                seed = stable_hash(
                    "aug", self.seed, self.name, sample["__pass__"], sample["__shard__"], sample["__index__"]
                )
                image, text = self.decoder(sample, seed)
                teacher = self.decoder.teacher_features(sample) if self.decoder.stored_teacher else None
            except Skip as skip:
                self.skipped[skip.reason] += 1
                # a shard that ended early (or stalled) loses its rest at once: the blocks guard counts those
                bad_samples += sample is not None
                if self.logged < self.max_errors_logged and sample is not None:
                    self.logged += 1
                    log.warning("skipped sample %s in %s: %s", sample.get("__key__"), sample.get("__url__"), skip)
                if bad_samples >= self.give_up_samples or bad_blocks >= self.give_up_blocks:
                    raise DataError(
                        f"source {self.name!r}, stream {self.stream}: {bad_samples} samples in {bad_blocks} "
                        f"blocks in a row were unusable ({dict(self.skipped)}); check the shards and "
                        f"data.image_keys / data.caption_key"
                    ) from None
                continue
            bad_samples = bad_blocks = 0
            out.append((image, text, sample["__key__"], sample["__pass__"], teacher))
        return out

    def state(self) -> StreamPosition:
        return StreamPosition(self.position.segment, self.position.block, self.position.offset, dict(self.skipped))


class StreamDataset(IterableDataset):
    """An infinite stream of batches for one rank. The rank's micro-batch j (counted from the
    start of training: step x accum_steps + micro) is made by stream slot j % W; worker i of a
    loader started at micro-batch `first_batch` serves slot (first_batch + i) % W, so a resumed
    DataLoader (whose worker 0 always answers first) continues exactly where the other stopped."""

    def __init__(
        self,
        sources: list[tuple[str, StreamPlan]],
        schedule: MixtureSchedule,
        rank: int,
        world_size: int,
        workers_per_rank: int,
        accum_steps: int,
        first_batch: int,
        positions: dict[int, dict[str, StreamPosition]],
        decoder: SampleDecoder,
        tokenizer: Callable,
        seed: int,
        max_errors_logged: int = 5,
        read_timeout: float | None = None,
        storage: dict | None = None,
    ):
        self.sources, self.schedule = sources, schedule
        self.storage = storage  # remote-read settings, re-applied in each worker (whatever its start method)
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers_per_rank)
        self.accum_steps, self.first_batch = accum_steps, first_batch
        self.positions, self.decoder, self.tokenizer = positions, decoder, tokenizer
        self.seed, self.max_errors_logged, self.read_timeout = seed, max_errors_logged, read_timeout

    def slot(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (self.first_batch + worker) % self.workers

    def __iter__(self):
        slot = self.slot()
        stream = self.rank * self.workers + slot
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # workers decode; the training process owns the cores
            if self.storage is not None:
                configure_storage(**self.storage)
        saved = self.positions.get(stream, {})
        readers = [
            SourceStream(
                name,
                plan,
                stream,
                saved.get(name) or StreamPosition(),
                self.decoder,
                self.seed,
                self.max_errors_logged,
                self.read_timeout,
            )
            for name, plan in self.sources
        ]
        batch_index = self.first_batch + (slot - self.first_batch) % self.workers
        while True:
            step, micro = divmod(batch_index, self.accum_steps)
            counts = self.schedule.micro_counts(step, micro * self.world_size + self.rank)
            images, texts, keys, names, passes, teacher = [], [], [], [], [], []
            for reader, count in zip(readers, counts):
                for image, text, key, data_pass, stored in reader.take(count):
                    images.append(image)
                    texts.append(text)
                    keys.append(key)
                    names.append(reader.name)
                    passes.append(data_pass)
                    teacher.append(stored)
            yield {
                **stored_teacher_batch(teacher),
                "images": self.decoder.collate(images),
                "texts": self.tokenizer(texts),
                "keys": keys,
                "sources": names,
                "passes": passes,
                "counts": list(counts),
                "stream": stream,
                "batch_index": batch_index,
                "positions": {r.name: r.state() for r in readers},
            }
            batch_index += self.workers


def stored_teacher_batch(teacher: list) -> dict:
    """The batch's teacher features (distill.source=shards) as the live teacher's output keys; {} without."""
    if not teacher or teacher[0] is None:
        return {}
    shapes = {(t[0].shape, t[1].shape) for t in teacher}
    if len(shapes) > 1:
        raise DataError(
            f"distill.source=shards: the samples carry teacher features of several widths {sorted(shapes)}: the "
            "sources were embedded by different teachers; embed them all with the one teacher"
        )
    return {
        "teacher_image_features": torch.from_numpy(np.stack([t[0] for t in teacher])),
        "teacher_text_features": torch.from_numpy(np.stack([t[1] for t in teacher])),
        "teacher_logit_scale": torch.tensor([teacher[0][2]], dtype=torch.float32),
    }
