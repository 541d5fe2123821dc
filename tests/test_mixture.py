"""The mixture schedule: per-batch shares exact to one sample, spread over micro-batches, resumable."""

import math
import random

import pytest

from clipscale.config import BatchLayout
from clipscale.data.mixture import MixtureSchedule, ScheduleState


@pytest.mark.parametrize(
    "weights, batch, world, accum, workers",
    [
        ([0.75, 0.25], 8, 2, 1, 2),
        ([0.7, 0.3], 96, 4, 2, 3),
        ([1, 1, 1], 10, 5, 1, 1),
        ([0.5, 0.3, 0.15, 0.05], 1000, 8, 1, 2),
        ([3e-4, 1 - 3e-4], 64, 2, 2, 1),
        ([1], 12, 3, 1, 1),
        ([0.2, 0.2, 0.2, 0.2, 0.2], 7, 7, 1, 4),
        ([0.6, 0.3, 0.1], 5, 1, 1, 2),
    ],
)
def test_every_batch_holds_each_share_to_one_sample(weights, batch, world, accum, workers):
    micro = world * accum
    batch = batch * micro
    sched = MixtureSchedule(weights, BatchLayout(batch // micro, world, accum, workers))
    share = [w / sum(weights) for w in weights]
    total = [0] * len(weights)
    for step in range(400):
        counts = sched.batch_counts(step)
        assert sum(counts) == batch
        for k, c in enumerate(counts):
            assert abs(c - share[k] * batch) < 1, (step, counts)
            total[k] += c
        per_micro = [sched.micro_counts(step, m) for m in range(micro)]
        assert all(sum(c) == batch // micro for c in per_micro)
        assert [sum(c[k] for c in per_micro) for k in range(len(weights))] == counts
        for k in range(len(weights)):
            assert max(c[k] for c in per_micro) - min(c[k] for c in per_micro) <= 1
    for k in range(len(weights)):  # the long-run share converges: each stream is at most ~1 sample off
        assert abs(total[k] - share[k] * batch * 400) <= world * workers + len(weights)
    assert sched.state_at(400).delivered == total


@pytest.mark.parametrize("world, accum, workers", [(1, 1, 2), (2, 1, 2), (2, 2, 1), (3, 2, 4), (4, 1, 3)])
@pytest.mark.parametrize("weights, batch", [([40, 42], 4), ([0.5, 0.3, 0.15, 0.05], 7), ([0.6, 0.3, 0.1], 5)])
def test_every_stream_draws_every_source_at_its_weight(weights, batch, world, accum, workers):
    """Per-stream fairness: the streams' draws of each source stay within a few samples of each
    other (a fixed rotation aliased with the worker round-robin: one stream never drew a source)."""
    sched = MixtureSchedule(weights, BatchLayout(batch, world, accum, workers))
    draws = {}
    for step in range(2000):
        streams = sched.stream_of_micro(step)
        for m in range(world * accum):
            d = draws.setdefault(int(streams[m]), [0] * len(weights))
            for k, c in enumerate(sched.micro_counts(step, m)):
                d[k] += c
        if (step + 1) % (workers * world) == 0 and len(draws) == world * workers:
            for k in range(len(weights)):
                assert max(d[k] for d in draws.values()) - min(d[k] for d in draws.values()) <= 6, (step, k)


def test_a_schedule_continues_exactly_from_a_saved_state():
    a = MixtureSchedule([0.6, 0.3, 0.1], BatchLayout(10, 5, 1, 2))
    full = [a.batch_counts(t) for t in range(300)]
    saved = ScheduleState.from_state(a.state_at(137).to_state())
    b = MixtureSchedule([0.6, 0.3, 0.1], BatchLayout(10, 5, 1, 2), origin=saved)
    assert [b.batch_counts(t) for t in range(137, 300)] == full[137:]
    random_order = random.Random(0).sample(range(137, 300), 40)
    assert [b.batch_counts(t) for t in random_order] == [full[t] for t in random_order]
    with pytest.raises(ValueError, match="before the schedule's origin"):
        b.batch_counts(10)


def test_weights_are_normalised_and_tiny_weights_still_get_samples():
    sched = MixtureSchedule([1e-6, 1.0], BatchLayout(100, 1, 1, 1))
    small = sum(sched.batch_counts(t)[0] for t in range(20_000))
    assert math.isclose(small, 20_000 * 100 * 1e-6 / (1 + 1e-6), abs_tol=2)


@pytest.mark.parametrize("seed", range(6))
def test_random_mixtures_keep_batches_streams_and_totals_exact(seed):
    """Random weights (also tiny ones), micro-batch sizes, ranks, accumulation and workers: every
    batch floor/ceil, every micro-batch sums to b, and after 600 batches each source's total and
    each stream's draws are within a few samples of the weights."""
    rng = random.Random(seed)
    for _ in range(25):
        k = rng.randint(1, 5)
        weights = [rng.random() + 0.01 for _ in range(k)]
        if rng.random() < 0.3:
            weights[0] *= 0.01
        b, world, accum, workers = (
            rng.randint(1, 40),
            rng.choice([1, 2, 3, 4, 8]),
            rng.choice([1, 2, 3]),
            rng.randint(1, 4),
        )
        sched = MixtureSchedule(weights, BatchLayout(b, world, accum, workers))
        share = [w / sum(weights) for w in weights]
        batch = b * world * accum
        totals, draws, made = [0] * k, {}, {}
        for step in range(600):
            counts = sched.batch_counts(step)
            assert all(abs(c - s * batch) < 1 for c, s in zip(counts, share)), (weights, b, world, accum, workers)
            for micro, stream in enumerate(sched.stream_of_micro(step).tolist()):
                row = sched.micro_counts(step, micro)
                assert sum(row) == b
                draws[stream] = [d + c for d, c in zip(draws.get(stream, [0] * k), row)]
                made[stream] = made.get(stream, 0) + 1
            totals = [t + c for t, c in zip(totals, counts)]
        assert max(abs(t - s * batch * 600) for t, s in zip(totals, share)) <= 2
        assert max(abs(d[i] - made[st] * b * share[i]) for st, d in draws.items() for i in range(k)) <= 4
