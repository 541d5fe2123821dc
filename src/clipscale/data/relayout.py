"""Resuming on another stream layout (world size x workers, seed or shuffle settings changed).

Exact batch order cannot carry over when the number of streams changes, but the set of samples
already consumed can: the stream positions of the checkpoint, replayed on indices only (no data
is read), say exactly which samples of which shards were consumed. Everything not yet consumed
in the data passes already started becomes *leftover* items (whole shards, or the unread sample
ranges of partly read ones, each naming its shard), dealt to the new streams in exactly
balanced sample counts; the new streams read their leftovers first (in blocks of their own),
then continue the global shard sequence from the next untouched data pass (the frontier).

Guarantee: no sample is read twice within its data epoch, and every sample of the interrupted
epoch is read before any stream moves past the leftovers (each new stream's leftovers differ
in size by at most one sample).
"""

from __future__ import annotations

from .blocks import index_order
from .plan import Item, StreamPlan, StreamPosition, ranges_indices, ranges_len, to_ranges


def consumed_in_block(plan: StreamPlan, items: list[Item], offset: int) -> list[set[int]]:
    """Per item of a block: the sample indices among the block's first `offset` samples."""
    indices = [list(ranges_indices(plan.indices(it))) for it in items]
    consumed: list[set[int]] = [set() for _ in items]
    order = index_order([len(ix) for ix in indices], plan.block_seed(items), plan.shuffle_buffer, plan.shuffle)
    for n, (i, ordinal) in enumerate(order):
        if n >= offset:
            break
        consumed[i].add(indices[i][ordinal])
    return consumed


def unconsumed(plan: StreamPlan, positions: dict[int, StreamPosition]) -> tuple[list[Item], int]:
    """Every item (or rest of an item) not yet consumed below the new frontier, and that frontier."""
    S = plan.num_streams
    leftovers: list[Item] = []
    touched_until: dict[int, int] = {}
    frontier = plan.frontier
    for s in range(S):
        pos = positions.get(s) or StreamPosition()
        cursor, offset = pos.cursor, pos.offset
        end = cursor
        if offset > 0:
            _, block = next(plan.blocks(s, cursor))
            for item, used in zip(block, consumed_in_block(plan, block, offset)):
                rest = [i for i in ranges_indices(plan.indices(item)) if i not in used]
                if rest:
                    leftovers.append(plan.pinned(item, to_ranges(rest)))
            end = cursor + len(block)
        touched_until[s] = end
        old_left = plan.leftovers[s]
        leftovers.extend(old_left[end:])
        regular_touched = end - len(old_left)
        if regular_touched > 0:
            frontier = max(frontier, plan.frontier + s + (regular_touched - 1) * S + 1)
    # the new sequence starts at a data-pass boundary: a pass that was started is finished from
    # leftovers (under the old shard permutation), whatever the new seed or shuffle settings
    N = plan.num_shards
    frontier = -(-frontier // N) * N
    for s in range(S):
        j = max(0, touched_until[s] - len(plan.leftovers[s]))
        while (seq := plan.frontier + s + j * S) < frontier:
            leftovers.append(plan.pinned(Item(seq)))
            j += 1
    return [it for it in leftovers if plan.item_len(it) > 0], frontier


def deal_balanced(plan: StreamPlan, items: list[Item], num_streams: int) -> list[list[Item]]:
    """Split `items` over `num_streams` lists whose sample counts differ by at most one."""
    items = sorted(items, key=lambda it: (it.seq, it.include or (), it.shard))
    total = sum(plan.item_len(it) for it in items)
    quotas = [total // num_streams + (1 if s < total % num_streams else 0) for s in range(num_streams)]
    out: list[list[Item]] = [[] for _ in range(num_streams)]
    s = 0
    for item in items:
        indices = list(ranges_indices(plan.indices(item)))
        while indices:
            while quotas[s] == 0:
                s += 1
            take, indices = indices[: quotas[s]], indices[quotas[s] :]
            quotas[s] -= len(take)
            out[s].append(Item(item.seq, to_ranges(take), item.shard))
    return out


def relayout(old: StreamPlan, positions: dict[int, StreamPosition], new: StreamPlan) -> StreamPlan:
    """`new` (fresh plan for the new layout) continuing where `old` stopped; same shard list."""
    leftovers, frontier = unconsumed(old, positions)
    dealt = deal_balanced(old, leftovers, new.num_streams)
    return StreamPlan(
        new.shards,
        new.seed,
        new.num_streams,
        new.shuffle,
        new.block_shards,
        new.shuffle_buffer,
        frontier=frontier,
        leftovers=dealt,
    )


def remaining_samples(plan: StreamPlan) -> int:
    return sum(ranges_len(plan.indices(it)) for left in plan.leftovers for it in left)
