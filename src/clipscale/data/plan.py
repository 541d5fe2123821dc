"""Which samples each (rank, worker) stream reads, in which order: a pure function of the config.

The global shard sequence G is the concatenation of one permutation of the shard list per
data epoch ("pass"): G[g] = perm(seed, g // N)[g % N]. With S = world_size x workers streams,
stream s reads the *items* G[F + s], G[F + s + S], G[F + s + 2S], ... (F = 0 for a fresh
run), preceded by any `leftover` items a resume on another layout handed to it (see
`relayout`). Items are read in blocks of `block_shards`; inside a block, samples are mixed
by `blocks.block_order`, a deterministic shuffle seeded by the block's content.

A stream's position is (cursor, offset): the index of the first item of its current block
and how many samples of that block were consumed. Everything before the cursor is skipped
without reading a byte, which is what makes resume cheap and exact.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

from ..wds.shardlist import Shard
from ..wds.urls import shard_name

Ranges = tuple[tuple[int, int], ...]


def stable_hash(*parts) -> int:
    """A 63-bit hash of `parts` that is the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Item:
    """One shard read by one stream: position `seq` in the global shard sequence (which fixes its data
    pass and augmentation seeds), the shard itself (explicit for leftovers of a relayout, else
    the permutation's choice), and optionally only the sample indices in `include` (half-open
    ranges); None means the whole shard."""

    seq: int
    include: Ranges | None = None
    shard: int | None = None

    def to_state(self) -> list:
        return [self.seq, None if self.include is None else [list(r) for r in self.include], self.shard]

    @staticmethod
    def from_state(state) -> Item:
        seq, include, shard = state
        return Item(
            int(seq),
            None if include is None else tuple((int(a), int(b)) for a, b in include),
            None if shard is None else int(shard),
        )


@dataclass
class StreamPosition:
    """How far one stream has been consumed: the index of the first item of its current block
    (`cursor`), the samples of that block consumed (`offset`), and the samples skipped so far
    as unusable, by reason."""

    cursor: int = 0
    offset: int = 0
    skipped: dict = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"cursor": self.cursor, "offset": self.offset, "skipped": dict(self.skipped)}

    @staticmethod
    def from_state(state: dict) -> StreamPosition:
        return StreamPosition(int(state["cursor"]), int(state["offset"]), dict(state.get("skipped", {})))


def ranges_len(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def ranges_indices(ranges: Ranges) -> Iterator[int]:
    for a, b in ranges:
        yield from range(a, b)


def to_ranges(indices) -> Ranges:
    """Sorted unique indices → merged half-open ranges."""
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


class StreamPlan:
    """The deterministic assignment of shard items to `num_streams` streams."""

    def __init__(
        self,
        shards: list[Shard],
        seed: int,
        num_streams: int,
        shuffle: bool = True,
        block_shards: int = 2,
        shuffle_buffer: int = 1000,
        frontier: int = 0,
        leftovers: list[list[Item]] | None = None,
    ):
        if num_streams < 1:
            raise ValueError("num_streams must be >= 1")
        self.shards = shards
        self.seed = seed
        self.num_streams = num_streams
        self.shuffle = shuffle
        self.block_shards = block_shards
        self.shuffle_buffer = shuffle_buffer
        self.frontier = frontier
        self.leftovers = leftovers or [[] for _ in range(num_streams)]
        if len(self.leftovers) != num_streams:
            raise ValueError("one leftover list per stream is required")
        self._perm = lru_cache(maxsize=4)(self._make_perm)

    # ------------------------------------------------------------------ global sequence
    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def total_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def _make_perm(self, data_pass: int) -> tuple[int, ...]:
        order = list(range(self.num_shards))
        if self.shuffle:
            random.Random(stable_hash("shards", self.seed, data_pass)).shuffle(order)
        return tuple(order)

    def shard_index(self, seq: int) -> int:
        return self._perm(seq // self.num_shards)[seq % self.num_shards]

    def shard(self, item: Item) -> Shard:
        return self.shards[item.shard if item.shard is not None else self.shard_index(item.seq)]

    def pinned(self, item: Item, include: Ranges | None = None) -> Item:
        """`item` with its shard named explicitly (valid in any plan over the same shard list)."""
        shard = item.shard if item.shard is not None else self.shard_index(item.seq)
        return Item(item.seq, item.include if include is None else include, shard)

    def data_pass(self, item: Item) -> int:
        return item.seq // self.num_shards

    def indices(self, item: Item) -> Ranges:
        """The sample indices an item reads, clipped to the shard's count."""
        n = self.shard(item).samples
        if item.include is None:
            return ((0, n),) if n > 0 else ()
        return tuple((a, min(b, n)) for a, b in item.include if a < min(b, n))

    def item_len(self, item: Item) -> int:
        return ranges_len(self.indices(item))

    # ------------------------------------------------------------------ streams
    def items(self, stream: int, start: int = 0) -> Iterator[Item]:
        """Stream `stream`'s infinite item list, from item index `start`."""
        left = self.leftovers[stream]
        yield from left[start:]
        first_regular = max(0, start - len(left))
        for j in itertools.count(first_regular):
            yield Item(self.frontier + stream + j * self.num_streams)

    def _group(self, stream: int, index: int, item: Item) -> tuple:
        """Items of one block share a group: leftover-or-regular, and the data pass."""
        return (index < len(self.leftovers[stream]), self.data_pass(item))

    def blocks(self, stream: int, cursor: int = 0) -> Iterator[tuple[int, list[Item]]]:
        """(cursor, items) for each block of the stream, starting at the block at `cursor`.

        A block is up to `block_shards` consecutive items of one group, so a stream finishes
        every sample of a data pass (and of its leftovers) before it reads the next one.
        `cursor` must be a block start, which every recorded position is.
        """
        it = self.items(stream, cursor)
        pending = next(it)
        while True:
            block = [pending]
            group = self._group(stream, cursor, pending)
            while True:
                pending = next(it)
                if len(block) == self.block_shards or self._group(stream, cursor + len(block), pending) != group:
                    break
                block.append(pending)
            yield cursor, block
            cursor += len(block)

    def block_seed(self, items: list[Item]) -> int:
        return stable_hash("block", self.seed, [i.to_state() for i in items])

    # ------------------------------------------------------------------ state
    def layout(self) -> dict:
        """What a checkpoint must record to rebuild this plan (with the shard list)."""
        return {
            "num_streams": self.num_streams,
            "frontier": self.frontier,
            "leftovers": [[it.to_state() for it in left] for left in self.leftovers],
            "shards": [[s.url, s.samples] for s in self.shards],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_shards": self.block_shards,
            "shuffle_buffer": self.shuffle_buffer,
        }

    @staticmethod
    def from_layout(layout: dict) -> StreamPlan:
        return StreamPlan(
            shards=[Shard(url, int(n)) for url, n in layout["shards"]],
            seed=int(layout["seed"]),
            num_streams=int(layout["num_streams"]),
            shuffle=bool(layout["shuffle"]),
            block_shards=int(layout["block_shards"]),
            shuffle_buffer=int(layout["shuffle_buffer"]),
            frontier=int(layout["frontier"]),
            leftovers=[[Item.from_state(s) for s in left] for left in layout["leftovers"]],
        )

    def _shard_key(self) -> list:
        return [[shard_name(s.url), s.samples] for s in self.shards]  # shards may have moved

    def same_shards_as(self, other: StreamPlan) -> bool:
        return self._shard_key() == other._shard_key()

    def same_streams_as(self, other: StreamPlan) -> bool:
        """Same shards and stream parameters: positions of one are positions of the other."""
        keys = ("num_streams", "seed", "shuffle", "block_shards", "shuffle_buffer")
        return self.same_shards_as(other) and all(self.layout()[k] == other.layout()[k] for k in keys)

    def with_shards(self, shards: list[Shard]) -> StreamPlan:
        """This plan reading `shards` (same names and counts, possibly other URLs)."""
        return StreamPlan(
            shards,
            self.seed,
            self.num_streams,
            self.shuffle,
            self.block_shards,
            self.shuffle_buffer,
            self.frontier,
            self.leftovers,
        )
