"""Resuming one source on another stream layout (world size x workers, seed or shuffle settings).

Exact batch order cannot carry over when the number of streams changes, but the set of samples
already consumed can: the stream positions of the checkpoint, replayed on indices (no data is
read), say exactly which samples of which shards each old stream consumed. Everything not yet
consumed in the data passes already started becomes *leftover* rows ([shard, first, end)
sample ranges), dealt to the new streams pass by pass in exactly balanced sample counts; the new
streams read their leftovers first (in blocks of their own), then continue with the regular
passes from the first pass nobody had started (the new frontier).

Guarantee: no sample is read twice within its data pass and none is lost; every new stream's
leftovers of each pass differ in size by at most one sample. Everything works on ranges (numpy),
never on per-sample lists: a LAION-2B-sized source (231,000 shards x 10,000 samples) interrupted
on 4,096 streams re-lays out onto 3,072 in seconds (benchmarks/plan_scale.py).
"""

from __future__ import annotations

import numpy as np

from .plan import Segment, StreamPlan, StreamPosition, empty_rows, rows_size


def _index_ranges(indices: np.ndarray) -> np.ndarray:
    """Sorted unique sample indices -> rows [first, end) of consecutive runs."""
    if len(indices) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(indices)]])
    return np.stack([indices[starts], indices[ends - 1] + 1], axis=1)


def unconsumed_in_block(plan: StreamPlan, stream: int, pos: StreamPosition) -> np.ndarray:
    """Rows [shard, first, end) of the block at `pos` that its first `pos.offset` outputs left unread."""
    _, blocks = plan.blocks(stream, pos.segment)
    items = blocks[pos.block]
    order = plan.block_order(stream, pos.segment, pos.block)
    mask = order.unconsumed_mask(pos.offset)
    out = []
    for i, item in enumerate(items):
        left = np.sort(order.ordinals[mask & (order.items == i)])
        if len(left) == 0:
            continue
        indices = item.indices()[left]
        ranges = _index_ranges(indices)
        out.append(np.column_stack([np.full(len(ranges), item.shard, dtype=np.int64), ranges]))
    return np.concatenate(out) if out else empty_rows()


def _rest_of_segment(plan: StreamPlan, stream: int, pos: StreamPosition) -> np.ndarray:
    """Rows of the stream's current segment from the block after pos.block on."""
    seg, blocks = plan.blocks(stream, pos.segment)
    rows = [
        np.column_stack([np.full(len(it.ranges), it.shard, dtype=np.int64), it.ranges])
        for items in blocks[pos.block + 1 :]
        for it in items
    ]
    return np.concatenate(rows) if rows else empty_rows()


def unconsumed(plan: StreamPlan, positions: dict[int, StreamPosition]) -> tuple[dict[int, list[np.ndarray]], int]:
    """Per data pass, the rows no stream has consumed below the new frontier; and that frontier
    (the first regular pass no stream had started)."""
    started = []  # per stream: the last regular pass it has read anything of (-1: none)
    for s in range(plan.num_streams):
        pos = positions.get(s) or StreamPosition()
        seg = plan.segment(s, pos.segment)
        if seg.leftover:
            started.append(-1)
        elif pos.block or pos.offset:
            started.append(seg.data_pass)
        else:  # at the start of a pass: it finished the one before, if that was a regular pass too
            started.append(seg.data_pass - 1 if pos.segment > len(plan.leftovers[s]) else -1)
    frontier = max(plan.frontier, max(started) + 1)
    by_pass: dict[int, list[np.ndarray]] = {}
    for s in range(plan.num_streams):
        pos = positions.get(s) or StreamPosition()
        left = plan.leftovers[s]
        seg = plan.segment(s, pos.segment)
        if pos.offset:
            by_pass.setdefault(seg.data_pass, []).append(unconsumed_in_block(plan, s, pos))
            by_pass[seg.data_pass].append(_rest_of_segment(plan, s, pos))
        elif pos.block:
            by_pass.setdefault(seg.data_pass, []).append(
                _rest_of_segment(plan, s, StreamPosition(pos.segment, pos.block - 1))
            )
        else:
            by_pass.setdefault(seg.data_pass, []).append(seg.rows)
        for later in left[pos.segment + 1 :]:
            by_pass.setdefault(later.data_pass, []).append(later.rows)
        first_regular = seg.data_pass + 1 if not seg.leftover else plan.frontier
        for data_pass in range(first_regular, frontier):
            by_pass.setdefault(data_pass, []).append(plan.rows_of(data_pass, *plan.share(s, data_pass)))
    kept = {p: rows for p, rows in by_pass.items() if p < frontier}
    return kept, frontier


def deal_balanced(rows: np.ndarray, num_streams: int) -> list[np.ndarray]:
    """Cut `rows` (in order) into `num_streams` consecutive parts whose sample counts differ by at
    most one; a row is split where a cut falls inside it."""
    sizes = rows[:, 2] - rows[:, 1]
    ends = np.cumsum(sizes)
    total = int(ends[-1]) if len(ends) else 0
    starts = ends - sizes
    cuts = [s * total // num_streams for s in range(num_streams + 1)]
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if hi == lo:
            out.append(empty_rows())
            continue
        first = int(np.searchsorted(ends, lo, side="right"))
        last = int(np.searchsorted(starts, hi, side="left"))
        part = rows[first:last].copy()
        part[0, 1] += lo - starts[first]
        part[-1, 2] -= ends[last - 1] - hi
        out.append(part)
    return out


def relayout(old: StreamPlan, positions: dict[int, StreamPosition], new: StreamPlan) -> StreamPlan:
    """`new` (a fresh plan for the new layout, same shard list) continuing where `old` stopped."""
    by_pass, frontier = unconsumed(old, positions)
    leftovers: list[list[Segment]] = [[] for _ in range(new.num_streams)]
    for data_pass in sorted(by_pass):
        rows = np.concatenate(by_pass[data_pass]) if by_pass[data_pass] else empty_rows()
        rows = rows[rows[:, 2] > rows[:, 1]]
        if len(rows) == 0:
            continue
        for s, part in enumerate(deal_balanced(rows, new.num_streams)):
            if len(part):
                leftovers[s].append(Segment(data_pass, part, leftover=True))
    return StreamPlan(
        new.shards,
        new.seed,
        new.num_streams,
        new.shuffle,
        new.block_shards,
        new.shuffle_buffer,
        new.name,
        frontier=frontier,
        leftovers=leftovers,
    )


def remaining_samples(plan: StreamPlan) -> int:
    """Samples of the leftovers (what the interrupted passes still owe)."""
    return sum(rows_size(seg.rows) for left in plan.leftovers for seg in left)
