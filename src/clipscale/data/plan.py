"""Which samples each (rank, worker) stream reads from one source, in which order: a pure function
of the config, computed on indices (numpy) so that a LAION-sized source plans in milliseconds.

Every data pass ("epoch") p of a source permutes its shards with (seed, name, p) and lays their
samples end to end: pass coordinates 0 .. T-1 (T = the source's samples). With S = world_size x
workers streams, stream s reads the coordinates [floor(sT/S), floor((s+1)T/S)) of every pass:
one of S equal *shares*, whole shards and the parts of the two shards at its ends - so every
stream reads the same number of samples of every pass, to one sample, whatever the shard sizes;
the shares rotate from pass to pass (stream s reads share (s + p) mod S), so over any number of
passes the streams' totals differ by at most one sample too. A stream
reads its share in blocks of `block_shards` shard pieces (`blocks.BlockOrder` mixes each block),
finishing pass p before it reads pass p + 1.

After a resume on another layout (`relayout`), a stream first reads its *leftovers*: segments
(pass, rows of [shard, first, end) sample ranges) dealt to it from what the old streams had not
consumed; then it continues with the regular passes from `frontier` on.

A stream's position is (segment, block, offset): its leftover segments are numbered first, then
its regular passes; `block` counts the blocks of that segment and `offset` the samples of that
block already consumed. Everything before the block is skipped without reading a byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ..wds.shardlist import Shard
from ..wds.urls import shard_name
from .blocks import BlockOrder


def stable_hash(*parts) -> int:
    """A 63-bit hash of `parts` that is the same in every process and Python run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class StreamPosition:
    """How far one stream has read one source: its segment (leftover segments first, then the
    regular passes), the block of that segment, the samples of that block consumed, and the
    samples skipped so far as unusable, by reason."""

    segment: int = 0
    block: int = 0
    offset: int = 0
    skipped: dict = field(default_factory=dict)

    def to_state(self) -> dict:
        return {"segment": self.segment, "block": self.block, "offset": self.offset, "skipped": dict(self.skipped)}

    @staticmethod
    def from_state(state: dict) -> StreamPosition:
        return StreamPosition(
            int(state["segment"]), int(state["block"]), int(state["offset"]), dict(state.get("skipped", {}))
        )


@dataclass
class Item:
    """The samples one block reads from one shard: `ranges` of sample indices, rows [first, end)."""

    shard: int
    ranges: np.ndarray

    @property
    def size(self) -> int:
        return int((self.ranges[:, 1] - self.ranges[:, 0]).sum())

    def indices(self) -> np.ndarray:
        """Every sample index, in shard (= reading) order."""
        return np.concatenate([np.arange(a, b) for a, b in self.ranges]) if len(self.ranges) else np.zeros(0, np.int64)


@dataclass
class Segment:
    """A stretch of one stream's work: rows [shard, first, end) of one data pass, read in order."""

    data_pass: int
    rows: np.ndarray
    leftover: bool

    @property
    def size(self) -> int:
        return int((self.rows[:, 2] - self.rows[:, 1]).sum()) if len(self.rows) else 0


def rows_size(rows: np.ndarray) -> int:
    return int((rows[:, 2] - rows[:, 1]).sum()) if len(rows) else 0


def empty_rows() -> np.ndarray:
    return np.zeros((0, 3), dtype=np.int64)


class StreamPlan:
    """The deterministic assignment of one source's samples to `num_streams` streams."""

    def __init__(
        self,
        shards: list[Shard],
        seed: int,
        num_streams: int,
        shuffle: bool = True,
        block_shards: int = 2,
        shuffle_buffer: int = 1000,
        name: str = "",
        frontier: int = 0,
        leftovers: list[list[Segment]] | None = None,
    ):
        if num_streams < 1:
            raise ValueError("num_streams must be >= 1")
        self.shards = shards
        self.sizes = np.fromiter((s.samples for s in shards), dtype=np.int64, count=len(shards))
        if (self.sizes <= 0).any():
            raise ValueError("every shard of a plan must hold samples (resolve_shards drops empty ones)")
        self.total_samples = int(self.sizes.sum())  # may be fewer than the streams: see share()
        self.seed, self.num_streams, self.shuffle = seed, num_streams, shuffle
        self.block_shards, self.shuffle_buffer, self.name = block_shards, shuffle_buffer, name
        self.frontier = frontier
        self.leftovers = leftovers if leftovers is not None else [[] for _ in range(num_streams)]
        if len(self.leftovers) != num_streams:
            raise ValueError("one leftover list per stream is required")
        self._fingerprint: str | None = None
        self._cache()

    def _cache(self) -> None:
        self._order = lru_cache(maxsize=4)(self._make_order)
        self._blocks = lru_cache(maxsize=8)(self._make_blocks)

    def __getstate__(self) -> dict:
        """Picklable (DataLoader workers started by spawn or forkserver): the caches are rebuilt there."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_order", "_blocks")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache()

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    # ------------------------------------------------------------------ passes
    def _make_order(self, data_pass: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation of the shards, pass coordinate where each permuted shard starts + the end)."""
        if self.shuffle:
            rng = np.random.default_rng(stable_hash("shards", self.seed, self.name, data_pass))
            perm = rng.permutation(self.num_shards)
        else:
            perm = np.arange(self.num_shards)
        starts = np.zeros(self.num_shards + 1, dtype=np.int64)
        np.cumsum(self.sizes[perm], out=starts[1:])
        return perm, starts

    def share(self, stream: int, data_pass: int) -> tuple[int, int]:
        """The pass coordinates [lo, hi) stream `stream` reads in regular pass `data_pass`. A source
        with fewer samples than streams gives some streams an empty share of a pass: such a stream
        goes on to its share of the next pass; shares rotate, so over any `num_streams` passes every
        stream reads `total_samples` samples, and the source's mixture weight holds."""
        total, count = self.total_samples, self.num_streams
        index = (stream + data_pass) % count
        return index * total // count, (index + 1) * total // count

    def rows_of(self, data_pass: int, lo: int, hi: int) -> np.ndarray:
        """Rows [shard, first, end) holding the pass coordinates [lo, hi), in pass order."""
        if hi <= lo:
            return empty_rows()
        perm, starts = self._order(data_pass)
        first = int(np.searchsorted(starts, lo, side="right")) - 1
        last = int(np.searchsorted(starts, hi, side="left"))
        begin = starts[first:last]
        rows = np.empty((last - first, 3), dtype=np.int64)
        rows[:, 0] = perm[first:last]
        rows[:, 1] = np.maximum(lo - begin, 0)
        rows[:, 2] = np.minimum(hi, starts[first + 1 : last + 1]) - begin
        return rows

    # ------------------------------------------------------------------ segments and blocks
    def segment(self, stream: int, index: int) -> Segment:
        """The stream's segment `index`: a leftover segment, or its share of a regular pass."""
        left = self.leftovers[stream]
        if index < len(left):
            return left[index]
        data_pass = self.frontier + index - len(left)
        return Segment(data_pass, self.rows_of(data_pass, *self.share(stream, data_pass)), leftover=False)

    def _make_blocks(self, stream: int, index: int) -> tuple[Segment, list[list[Item]]]:
        seg = self.segment(stream, index)
        items: list[Item] = []
        rows = seg.rows
        if len(rows):
            # consecutive rows of one shard, in increasing sample order, make one item (a shard is a stream:
            # a range before the one just read starts a new item)
            breaks = np.flatnonzero((rows[1:, 0] != rows[:-1, 0]) | (rows[1:, 1] < rows[:-1, 2])) + 1
            for part in np.split(rows, breaks):
                items.append(Item(int(part[0, 0]), part[:, 1:]))
        blocks = [items[i : i + self.block_shards] for i in range(0, len(items), self.block_shards)]
        return seg, blocks

    def blocks(self, stream: int, segment: int) -> tuple[Segment, list[list[Item]]]:
        """The segment and its blocks (lists of up to `block_shards` items)."""
        return self._blocks(stream, segment)

    def block_order(self, stream: int, segment: int, block: int) -> BlockOrder:
        seg, blocks = self.blocks(stream, segment)
        items = blocks[block]
        seed = stable_hash("block", self.seed, self.name, stream, seg.data_pass, seg.leftover, segment, block)
        return BlockOrder([it.size for it in items], seed, self.shuffle_buffer, self.shuffle)

    def position_after(self, stream: int, samples: int) -> StreamPosition:
        """The position after a stream has consumed `samples` samples from the start of its plan
        (a simulation helper: no data is read)."""
        segment = 0
        while True:
            seg, blocks = self.blocks(stream, segment)
            if samples < seg.size:
                for b, items in enumerate(blocks):
                    n = sum(it.size for it in items)
                    if samples < n:
                        return StreamPosition(segment, b, samples)
                    samples -= n
            samples -= seg.size
            segment += 1
            if samples == 0:
                return StreamPosition(segment, 0, 0)

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> str:
        """Identifies the shard list (names and counts; the shards may have moved)."""
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            for s in self.shards:
                h.update(f"{shard_name(s.url)}\0{s.samples}\n".encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def settings(self) -> dict:
        """What must be equal for positions of one plan to be positions of another."""
        return {
            "num_streams": self.num_streams,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "block_shards": self.block_shards,
            "shuffle_buffer": self.shuffle_buffer,
            "fingerprint": self.fingerprint(),
            "samples": self.total_samples,
        }

    def layout(self) -> dict:
        """What a checkpoint must record to rebuild this plan (with the shard list)."""
        import torch

        return {
            **self.settings(),
            "name": self.name,
            "frontier": self.frontier,
            "leftovers": [
                [(seg.data_pass, torch.from_numpy(seg.rows.astype(np.int32))) for seg in left]
                for left in self.leftovers
            ],
        }

    @staticmethod
    def from_layout(layout: dict, shards: list[Shard]) -> StreamPlan:
        """The plan a checkpoint recorded, reading `shards` (whose fingerprint must match)."""
        leftovers = [
            [Segment(int(p), np.asarray(rows, dtype=np.int64).reshape(-1, 3), True) for p, rows in left]
            for left in layout["leftovers"]
        ]
        return StreamPlan(
            shards,
            int(layout["seed"]),
            int(layout["num_streams"]),
            bool(layout["shuffle"]),
            int(layout["block_shards"]),
            int(layout["shuffle_buffer"]),
            str(layout["name"]),
            int(layout["frontier"]),
            leftovers,
        )
