"""Resume on another stream layout: what was consumed is never re-read in its epoch, the rest is."""

import random

import pytest

from clipscale.data.plan import StreamPlan, StreamPosition
from clipscale.data.relayout import relayout, remaining_samples
from clipscale.data.stream import iter_stream
from clipscale.shards import write_shards
from clipscale.wds.shardlist import resolve_shards

from helpers import color_samples


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    sizes = [10, 7, 12, 9, 10, 5, 11]
    samples = list(color_samples(sum(sizes), size=8))
    start = 0
    for i, n in enumerate(sizes):
        write_shards(samples[start : start + n], d / f"p{i}", f"u{i}", n)
        start += n
    return resolve_shards("::".join(str(d / f"p{i}" / f"u{i}-000000.tar") for i in range(len(sizes))))


def ident(sample):
    return sample["__url__"], sample["__index__"]


def consume(plan, stream, n, start=(0, 0)):
    """Read n samples of a stream: their (shard, index, pass) and the position after them."""
    got, pos = [], start
    if n == 0:
        return got, StreamPosition(start[0], start[1])
    for sample, cursor, offset in iter_stream(plan, stream, start[0], start[1], lambda u, e: None):
        got.append((*ident(sample), sample["__pass__"]))
        pos = (cursor, offset)
        if len(got) == n:
            break
    return got, StreamPosition(pos[0], pos[1])


def epoch0(shards):
    from clipscale.data.plan import Item

    plan = StreamPlan(shards, 0, 1)
    return {(plan.shard(Item(g)).url, i) for g in range(len(shards)) for i in range(plan.shard(Item(g)).samples)}


@pytest.mark.parametrize(
    "old_streams, new_streams, block, shuffle, seed",
    [
        (4, 2, 2, True, 0),
        (2, 3, 2, True, 1),
        (3, 1, 3, True, 2),
        (4, 4, 1, False, 3),
        (1, 5, 2, True, 4),
    ],
)
def test_relayout_covers_the_epoch_without_repeats(uneven_shards, old_streams, new_streams, block, shuffle, seed):
    rng = random.Random(seed)
    old = StreamPlan(uneven_shards, seed, old_streams, shuffle, block, shuffle_buffer=4)
    consumed, positions = [], {}
    for s in range(old_streams):
        got, positions[s] = consume(old, s, rng.randrange(0, 20))
        consumed += got
    new = relayout(old, positions, StreamPlan(uneven_shards, seed + 7, new_streams, shuffle, block, 4))
    sizes = [sum(new.item_len(it) for it in left) for left in new.leftovers]
    assert max(sizes) - min(sizes) <= 1
    rest = []
    for s in range(new_streams):
        got, _ = consume(new, s, sizes[s])
        rest += got
    every = epoch0(uneven_shards)
    seen0 = [(u, i) for u, i, p in consumed + rest if p == 0]
    assert len(seen0) == len(set(seen0)), "a sample of epoch 0 was read twice"
    assert set(seen0) == every, "a sample of epoch 0 was never read"
    assert remaining_samples(new) == len(rest)
    # leftovers are read before anything new: the next sample of every stream is past them
    for s in range(new_streams):
        nxt, _ = consume(new, s, sizes[s] + 1)
        assert (nxt[-1][0], nxt[-1][1]) not in {(u, i) for u, i, _ in rest} or nxt[-1][2] > 0


def test_relayout_twice_still_covers_the_epoch(uneven_shards):
    plan = StreamPlan(uneven_shards, 0, 3, True, 2, 4)
    consumed, positions = [], {}
    for s in range(3):
        got, positions[s] = consume(plan, s, 6 + s)
        consumed += got
    plan = relayout(plan, positions, StreamPlan(uneven_shards, 0, 2, True, 2, 4))
    positions = {}
    for s in range(2):
        got, positions[s] = consume(plan, s, 9)
        consumed += got
    plan = relayout(plan, positions, StreamPlan(uneven_shards, 0, 5, True, 2, 4))
    for s in range(5):
        got, _ = consume(plan, s, sum(plan.item_len(it) for it in plan.leftovers[s]))
        consumed += got
    seen0 = [(u, i) for u, i, p in consumed if p == 0]
    assert len(seen0) == len(set(seen0)) and set(seen0) == epoch0(uneven_shards)


def test_blocks_do_not_straddle_data_passes(uneven_shards):
    plan = StreamPlan(uneven_shards, 0, 2, True, 3, 4)
    for s in range(2):
        for _, (_cursor, items) in zip(range(6), plan.blocks(s)):
            assert len({plan.data_pass(it) for it in items}) == 1
