"""The deterministic shuffle inside one block of shards.

Reads are a random interleaving of the block's shards (each shard read front to back, as a
tar stream must be), fed through a shuffle buffer of fixed size. The order is a function of
(the items' sample counts, the block seed, the buffer size) only, so the same code runs on
real samples (training) and on bare indices (to know which samples a position has consumed
without reading any data).

Trade-off, documented for users: samples mix across `block_shards` shards and within a
window of `shuffle_buffer` samples, not across the whole data set; the shard order itself is
re-shuffled every data pass. Larger blocks mix better and cost more open streams per worker.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def block_order(
    counts: Sequence[int],
    seed: int,
    buffer_size: int,
    shuffle: bool,
    fetch: Callable[[int], T],
) -> Iterator[T]:
    """Yield `fetch(i)` results (one per sample of item i, in read order per item) shuffled.

    `fetch(i)` is called exactly counts[i] times for each item i, always in the item's own
    sample order; what it returns is held in the buffer and yielded later.
    """
    if not shuffle:
        for i, c in enumerate(counts):
            for _ in range(c):
                yield fetch(i)
        return
    rng = random.Random(seed)
    reads = [i for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(reads)
    buf: list[T] = []
    for i in reads:
        buf.append(fetch(i))
        if len(buf) >= buffer_size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def index_order(counts: Sequence[int], seed: int, buffer_size: int, shuffle: bool) -> Iterator[tuple[int, int]]:
    """`block_order` on bare indices: yields (item position, ordinal within the item)."""
    taken = [0] * len(counts)

    def fetch(i: int) -> tuple[int, int]:
        taken[i] += 1
        return i, taken[i] - 1

    return block_order(counts, seed, buffer_size, shuffle, fetch)
