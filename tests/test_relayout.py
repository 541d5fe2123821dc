"""Stream plans and resume on another stream layout: what was consumed is never re-read in its data
pass, the rest is, and every stream reads an equal share of every pass."""

import random
from collections import Counter

import numpy as np
import pytest

from clipscale.data.plan import StreamPlan, StreamPosition
from clipscale.data.relayout import deal_balanced, relayout, remaining_samples
from clipscale.data.stream import iter_source
from clipscale.shards import write_shards
from clipscale.wds.shardlist import Shard, resolve_shards

from helpers import color_samples

SIZES = [10, 7, 12, 9, 10, 5, 11]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("uneven")
    samples = list(color_samples(sum(SIZES), size=8))
    start = 0
    for i, n in enumerate(SIZES):
        write_shards(samples[start : start + n], d / f"p{i}", f"u{i}", n)
        start += n
    return resolve_shards("::".join(str(d / f"p{i}" / f"u{i}-000000.tar") for i in range(len(SIZES))))


def consume(plan, stream, n, start=None):
    """Read n samples of a stream: their (shard url, index, pass) and the position after them."""
    got, pos = [], start or StreamPosition()
    if n == 0:
        return got, pos
    for sample, after in iter_source(plan, stream, pos, lambda u, e: pytest.fail(f"{u}: {e}")):
        got.append((sample["__url__"], sample["__index__"], sample["__pass__"]))
        pos = after
        if len(got) == n:
            break
    return got, pos


def every_sample(shards):
    return {(s.url, i) for s in shards for i in range(s.samples)}


def test_every_stream_reads_an_equal_share_of_every_pass(uneven_shards):
    total = sum(SIZES)
    for streams in (1, 3, 5, 8, total):
        plan = StreamPlan(uneven_shards, 0, streams, True, 2, 4)
        per_pass = Counter()
        seen = []
        for s in range(streams):
            got, _ = consume(plan, s, 3 * (-(-total // streams)))
            per_pass.update((s, p) for _, _, p in got)
            seen += [(u, i, p) for u, i, p in got]
        for p in (0, 1):
            shares = [per_pass[(s, p)] for s in range(streams)]
            assert max(shares) - min(shares) <= 1 and sum(shares) == total, (streams, p, shares)
            assert {(u, i) for u, i, q in seen if q == p} == every_sample(uneven_shards)
        # passes never interleave inside a stream
        for s in range(streams):
            got, _ = consume(plan, s, 2 * (-(-total // streams)))
            assert [p for *_, p in got] == sorted(p for *_, p in got)


def test_a_source_smaller_than_its_streams_is_read_whole_every_pass(uneven_shards):
    """64 samples on 100 streams: some streams have an empty share of a pass and go on to the next;
    every pass is still read exactly once across the streams, and over 100 passes every stream
    reads 64 samples (the same as every other stream: the source's weight holds on each)."""
    total, streams = sum(SIZES), 100
    plan = StreamPlan(uneven_shards, 0, streams, True, 2, 4)
    by_pass = Counter()
    for s in range(streams):
        got, _ = consume(plan, s, total)
        assert max(p for *_, p in got) < streams  # 64 samples = its shares of passes 0..99
        by_pass.update((p, u, i) for u, i, p in got)
    for p in range(streams):
        assert {(u, i) for q, u, i in by_pass if q == p} == every_sample(uneven_shards)
    assert set(by_pass.values()) == {1}


def test_order_is_a_pure_function_of_the_plan(uneven_shards):
    a = consume(StreamPlan(uneven_shards, 3, 2, True, 2, 4), 1, 40)[0]
    b = consume(StreamPlan(uneven_shards, 3, 2, True, 2, 4), 1, 40)[0]
    c = consume(StreamPlan(uneven_shards, 4, 2, True, 2, 4), 1, 40)[0]
    assert a == b and a != c


def test_positions_resume_exactly_and_position_after_agrees(uneven_shards):
    plan = StreamPlan(uneven_shards, 1, 3, True, 2, 4)
    whole, _ = consume(plan, 2, 60)
    for cut in (0, 1, 5, 17, 22, 41):
        first, pos = consume(plan, 2, cut)
        rest, _ = consume(plan, 2, 60 - cut, pos)
        assert first + rest == whole
        assert plan.position_after(2, cut) == StreamPosition(pos.segment, pos.block, pos.offset)


@pytest.mark.parametrize(
    "old_streams, new_streams, block, shuffle, seed, most",
    [
        (4, 2, 2, True, 0, 20),
        (2, 3, 2, True, 1, 50),
        (3, 1, 3, True, 2, 20),
        (4, 4, 1, False, 3, 30),
        (1, 5, 2, True, 4, 150),
        (5, 2, 1, True, 5, 70),
        (3, 7, 2, False, 6, 40),
    ],
)
def test_relayout_covers_every_started_pass_without_repeats(
    uneven_shards, old_streams, new_streams, block, shuffle, seed, most
):
    """Streams stopped anywhere, some of them passes ahead of others: after the re-layout every
    sample of every pass any stream had started is read exactly once in that pass."""
    rng = random.Random(seed)
    old = StreamPlan(uneven_shards, seed, old_streams, shuffle, block, shuffle_buffer=4)
    consumed, positions = [], {}
    for s in range(old_streams):
        got, positions[s] = consume(old, s, rng.randrange(0, most))
        consumed += got
    new = relayout(old, positions, StreamPlan(uneven_shards, seed + 7, new_streams, shuffle, block, 4))
    touched = {p for *_, p in consumed}
    assert new.frontier == max(touched, default=-1) + 1
    for p in range(new.frontier):
        sizes = [sum(seg.size for seg in left if seg.data_pass == p) for left in new.leftovers]
        assert max(sizes) - min(sizes) <= 1
    owed = [sum(seg.size for seg in left) for left in new.leftovers]
    assert remaining_samples(new) == sum(owed) == new.frontier * sum(SIZES) - len(consumed)
    rest = []
    for s in range(new_streams):
        got, pos = consume(new, s, owed[s])
        rest += got
        nxt, _ = consume(new, s, 1, pos)  # after its leftovers a stream reads the first untouched pass
        assert nxt[0][2] == new.frontier
    for p in range(new.frontier):
        seen = [(u, i) for u, i, q in consumed + rest if q == p]
        assert len(seen) == len(set(seen)), f"a sample of pass {p} was read twice"
        assert set(seen) == every_sample(uneven_shards), f"a sample of pass {p} was never read"


def test_relayout_twice_and_back_still_covers_the_passes(uneven_shards):
    plan = StreamPlan(uneven_shards, 0, 3, True, 2, 4)
    consumed = []
    for new_streams, n in ((2, [6, 7, 30]), (5, [9, 40]), (3, [3, 8, 1, 0, 12]), (3, [50, 2, 9])):
        positions = {}
        for s, k in enumerate(n):
            got, positions[s] = consume(plan, s, k)
            consumed += got
        plan = relayout(plan, positions, StreamPlan(uneven_shards, 0, new_streams, True, 2, 4))
    for s in range(plan.num_streams):
        got, _ = consume(plan, s, sum(seg.size for seg in plan.leftovers[s]))
        consumed += got
    for p in range(plan.frontier):
        seen = [(u, i) for u, i, q in consumed if q == p]
        assert len(seen) == len(set(seen)) and set(seen) == every_sample(uneven_shards)


def test_layout_round_trips_through_a_checkpoint(uneven_shards):
    plan = StreamPlan(uneven_shards, 0, 3, True, 2, 4)
    positions = {s: consume(plan, s, 5 * s + 3)[1] for s in range(3)}
    moved = relayout(plan, positions, StreamPlan(uneven_shards, 0, 2, True, 2, 4))
    again = StreamPlan.from_layout(moved.layout(), uneven_shards)
    assert again.settings() == moved.settings() and again.frontier == moved.frontier
    for s in range(2):
        assert consume(again, s, 30)[0] == consume(moved, s, 30)[0]


def test_deal_balanced_splits_rows_where_quotas_fall():
    rows = np.array([[0, 0, 5], [3, 2, 4], [1, 0, 9]])
    parts = deal_balanced(rows, 4)
    assert [int((p[:, 2] - p[:, 1]).sum()) for p in parts] == [4, 4, 4, 4]
    flat = [(int(r), i) for p in parts for r, a, b in p for i in range(a, b)]
    assert flat == [(int(r), i) for r, a, b in rows for i in range(a, b)]


def test_a_laion_sized_plan_is_planned_without_per_sample_work():
    shards = [Shard(f"/data/laion/{i:06d}.tar", 10_000) for i in range(20_000)]
    plan = StreamPlan(shards, 0, 1024, True, 2, 1000)
    positions = {s: plan.position_after(s, 20 * s % 3000) for s in range(1024)}
    new = relayout(plan, positions, StreamPlan(shards, 0, 768, True, 2, 1000))
    consumed = sum(20 * s % 3000 for s in range(1024))
    assert remaining_samples(new) == plan.total_samples - consumed


def fake_shards(monkeypatch, sizes, tag):
    """Shards that exist only as counts: the tar reader is replaced by one that yields numbered samples."""
    import clipscale.data.stream as stream_module

    counts = {f"/fake/{tag}{i:04d}.tar": n for i, n in enumerate(sizes)}

    def fake_iter(url, on_error, read_timeout=None):
        for i in range(counts[url]):
            yield {"__url__": url, "__key__": f"{url}:{i}"}

    monkeypatch.setattr(stream_module, "iter_raw_samples", fake_iter)
    return [Shard(url, n) for url, n in counts.items()]


def read(plan, stream, n, start=None):
    """(pass, shard, index) of the next n samples of a stream; a sample that does not arrive is a loss."""
    got, pos = [], start or StreamPosition()
    for sample, after in iter_source(plan, stream, pos, lambda u, e: None) if n else ():
        assert sample is not None, "a planned sample was not where the plan said (it would be skipped)"
        got.append((sample["__pass__"], sample["__shard__"], sample["__index__"]))
        pos = after
        if len(got) == n:
            break
    return got, pos


def test_a_stream_stopped_exactly_at_the_end_of_its_share_counts_as_having_read_it(monkeypatch):
    shards = fake_shards(monkeypatch, [100] * 10, "end")
    old = StreamPlan(shards, 0, 2, True, 2, 1000)
    positions = {s: old.position_after(s, 500) for s in range(2)}  # exactly one epoch each
    new = relayout(old, positions, StreamPlan(shards, 0, 4, True, 2, 1000))
    assert new.frontier == 1 and remaining_samples(new) == 0
    positions = {0: old.position_after(0, 500), 1: old.position_after(1, 480)}
    new = relayout(old, positions, StreamPlan(shards, 0, 4, True, 2, 1000))
    assert new.frontier == 1 and remaining_samples(new) == 20


def test_leftover_ranges_of_one_shard_out_of_order_are_read_as_separate_pieces(monkeypatch):
    shards = fake_shards(monkeypatch, [5], "order")
    old = StreamPlan(shards, 0, 3, False, 2, 4)
    positions = {0: StreamPosition(1, 0, 1), 1: StreamPosition(1, 0, 0), 2: StreamPosition(0, 0, 0)}
    new = relayout(old, positions, StreamPlan(shards, 0, 3, False, 2, 4))
    for s in range(3):
        read(new, s, sum(seg.size for seg in new.leftovers[s]))  # no planned sample goes missing


@pytest.mark.parametrize("seed", range(60))
def test_random_chains_of_relayouts_lose_and_repeat_nothing(monkeypatch, seed):
    """Random shard sizes, stream counts, block and buffer sizes, stops anywhere (also exactly at
    share ends), one to three re-layouts in a row: every started pass is read exactly once."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 12) for _ in range(rng.randint(1, 8))]
    shards, total = fake_shards(monkeypatch, sizes, f"c{seed}_"), sum(sizes)
    shuffle, block, buffer = rng.random() < 0.7, rng.randint(1, 3), rng.randint(1, 15)
    plan = StreamPlan(shards, seed, rng.randint(1, total), shuffle, block, buffer)
    consumed = []
    for _ in range(rng.randint(1, 3)):
        positions = {}
        for s in range(plan.num_streams):
            share = total // plan.num_streams
            n = rng.choice([0, share, 2 * share, rng.randint(0, 4 * share + 3)])
            got, positions[s] = read(plan, s, n)
            consumed += got
        new_streams = rng.randint(1, total)
        plan = relayout(plan, positions, StreamPlan(shards, seed, new_streams, shuffle, rng.randint(1, 3), buffer))
        for p in range(plan.frontier):
            sizes_p = [sum(seg.size for seg in left if seg.data_pass == p) for left in plan.leftovers]
            assert max(sizes_p) - min(sizes_p) <= 1
    for s in range(plan.num_streams):
        consumed += read(plan, s, sum(seg.size for seg in plan.leftovers[s]))[0]
    counts = Counter(consumed)
    assert not [k for k, v in counts.items() if v > 1], "a sample was read twice in its pass"
    for p in range(plan.frontier):
        assert len({(sh, i) for q, sh, i in counts if q == p}) == total, f"pass {p} is not complete"
