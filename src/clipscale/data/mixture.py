"""How many samples of each source go into every micro-batch: a deterministic schedule.

Weights hold per global batch, not only on average: global batch t (B samples) takes
`floor(B w_k)` or `floor(B w_k) + 1` samples of source k, never anything else, and each of its
M = world_size x accum_steps micro-batches takes `floor(c_k / M)` or one more of the batch's c_k.
Two kinds of credit decide who gets the odd samples, in exact integer arithmetic (weights are
rounded to parts in 10^12):

- a *global* credit per source: a source owed a whole sample gets it in this batch, so every
  source's total stays within a sample or two of `w_k x samples`, however long the run;
- a credit per *stream* and source (a stream is one DataLoader worker of one rank; every
  micro-batch is made by one stream): the other odd samples go to the sources, and then the
  micro-batches, whose streams are owed them most (net of what the batch gives them anyway). So
  every stream draws every source at its weight in the long run (within 3 samples in 1,500 random
  configurations of weights, batch, ranks, accumulation and workers; tests/test_mixture.py),
  the streams finish their equal shares of a
  source's epoch together, and a source is not repeated by one stream while another still owes
  samples of its current epoch (beyond a few per stream). Without this, a pattern in the odd
  samples that repeats with the worker round-robin could starve one stream of a source forever.

No random draws: the schedule is a pure function of (weights, batch, world size, accumulation,
workers) and the state it started from, so a resumed run continues it exactly; a resume on
another layout starts a new schedule from the step it resumed at, carrying over the samples each
source has delivered.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np

from ..config.layout import BatchLayout

UNITS = 10**12  # weights as integer parts of UNITS: exact, drift-free credit arithmetic


def weight_units(weights: list[float]) -> list[int]:
    """Normalised weights as integers summing to about UNITS (each >= 1)."""
    total = float(sum(weights))
    return [max(1, round(w / total * UNITS)) for w in weights]


@dataclass
class ScheduleState:
    """Where the schedule is: at the start of global batch `step`, the samples each source has
    delivered so far, the global credit of every source, and the credit of every stream x source."""

    step: int = 0
    delivered: list[int] = field(default_factory=list)
    credits: list[int] = field(default_factory=list)
    stream_credits: list[list[int]] = field(default_factory=list)

    def to_state(self) -> dict:
        return {
            "step": self.step,
            "delivered": list(self.delivered),
            "credits": list(self.credits),
            "stream_credits": [list(c) for c in self.stream_credits],
        }

    @staticmethod
    def from_state(state: dict) -> ScheduleState:
        return ScheduleState(
            int(state["step"]),
            [int(d) for d in state["delivered"]],
            [int(c) for c in state.get("credits", [])],
            [[int(c) for c in row] for row in state.get("stream_credits", [])],
        )

    def copy(self) -> ScheduleState:
        return ScheduleState(
            self.step, list(self.delivered), list(self.credits), [list(c) for c in self.stream_credits]
        )


class MixtureSchedule:
    """Per-source sample counts of every global batch and micro-batch."""

    def __init__(self, weights: list[float], layout: BatchLayout, origin: ScheduleState | None = None):
        self.units = weight_units(weights)
        self.unit = sum(self.units)  # credits count samples in 1/unit
        self.layout = layout
        batch_size, world_size = layout.per_rank_batch, layout.world_size
        self.batch_size, self.world_size, self.accum_steps = batch_size, world_size, layout.accum_steps
        self.workers = layout.workers
        self.micro_batches = layout.micro_batches
        self.global_batch = layout.global_batch
        self.num_streams = layout.streams
        k = len(weights)
        origin = origin.copy() if origin is not None else ScheduleState(0, [0] * k)
        if len(origin.credits) != k:  # a new schedule: every source starts even
            origin.credits = [0] * k
        if len(origin.stream_credits) != self.num_streams:  # a new layout: every stream starts even
            origin.stream_credits = [[0] * k for _ in range(self.num_streams)]
        self.origin = origin
        self.batch_base = [self.global_batch * u // self.unit for u in self.units]
        self.batch_owed = [self.global_batch * u % self.unit for u in self.units]
        self.ceils = self.global_batch - sum(self.batch_base)  # sources with one more sample, every batch
        self.micro_owed = np.array([batch_size * u for u in self.units], dtype=np.int64)  # b w_k, in 1/unit
        micro = np.arange(self.micro_batches)
        self._rank_of_micro, self._accum_of_micro = micro % world_size, micro // world_size
        self._reset()

    def _reset(self) -> None:
        o = self.origin
        self._step, self._delivered, self._credits = o.step, list(o.delivered), list(o.credits)
        self._stream_credits = np.array(o.stream_credits, dtype=np.int64).reshape(self.num_streams, -1)
        self._last: tuple[int, np.ndarray] | None = None

    @property
    def num_sources(self) -> int:
        return len(self.units)

    def stream_of_micro(self, step: int) -> np.ndarray:
        """The stream that makes each micro-batch of `step`: rank x workers + (its micro-batch
        number counted from step 0) mod workers."""
        worker = (step * self.accum_steps + self._accum_of_micro) % self.workers
        return self._rank_of_micro * self.workers + worker

    def _batch_counts(self, streams: np.ndarray) -> list[int]:
        """floor(B w_k) of every source, plus one more for `ceils` sources: first those owed a whole
        sample (global credit: totals stay within about a sample of the weights), then, of those
        within a sample of their due, the ones the step's streams are owed most, then the rest."""
        credit = [c + o for c, o in zip(self._credits, self.batch_owed)]
        # what the step's streams are still owed of each source once the batch gives them floor(B w_k)
        owed_here = (self._stream_credits[streams].sum(axis=0) - np.asarray(self.batch_base) * self.unit).tolist()
        band = self.unit
        due = [k for k in range(len(credit)) if credit[k] >= band]
        maybe = [k for k in range(len(credit)) if -band < credit[k] < band]
        never = [k for k in range(len(credit)) if credit[k] <= -band]
        order = (
            sorted(due, key=lambda k: (-credit[k], k))
            + sorted(maybe, key=lambda k: (-owed_here[k], -credit[k], k))
            + sorted(never, key=lambda k: (-credit[k], k))
        )
        counts = list(self.batch_base)
        for k in order[: self.ceils]:
            counts[k] += 1
            credit[k] -= self.unit
        self._credits = credit
        return counts

    def _advance(self) -> np.ndarray:
        """[M, K] counts of batch `self._step`; moves the state to the next batch."""
        m = self.micro_batches
        streams = self.stream_of_micro(self._step)
        np.add.at(self._stream_credits, streams, self.micro_owed)  # each micro-batch is owed b w_k of source k
        counts = self._batch_counts(streams)
        base, odd = np.divmod(np.asarray(counts, dtype=np.int64), m)
        np.subtract.at(self._stream_credits, streams, np.tile(base, (m, 1)) * self.unit)
        table = self._place_by_credit(streams, base, odd)
        if table is None:  # the greedy painted itself into a corner: Gale-Ryser's order always fits
            table = self._place_in_order(streams, base, odd)
        self._delivered = [d + c for d, c in zip(self._delivered, counts)]
        self._step += 1
        return table

    def _place_by_credit(self, streams: np.ndarray, base: np.ndarray, odd: np.ndarray) -> np.ndarray | None:
        """The [M, K] table with the odd samples placed one by one, each to the (micro-batch, source)
        pair whose stream is owed the most; at most one odd sample of a source per micro-batch.
        None when the remaining ones no longer fit."""
        m, unit = self.micro_batches, self.unit
        table = np.tile(base, (m, 1))
        room = np.full(m, self.batch_size - int(base.sum()), dtype=np.int64)
        need = odd.copy()
        credits = self._stream_credits.copy()
        heap = [(-int(credits[streams[i], k]), i, k) for i in range(m) for k in np.flatnonzero(need).tolist()]
        heapq.heapify(heap)
        left = int(need.sum())
        while left:
            if not heap:
                return None
            neg, i, k = heapq.heappop(heap)
            if not need[k] or not room[i] or table[i, k] != base[k]:
                continue
            now = int(credits[streams[i], k])
            if -neg != now:  # the stream got an odd sample of k in another of its micro-batches
                heapq.heappush(heap, (-now, i, k))
                continue
            table[i, k] += 1
            room[i] -= 1
            need[k] -= 1
            credits[streams[i], k] -= unit
            left -= 1
        self._stream_credits = credits
        return table

    def _place_in_order(self, streams: np.ndarray, base: np.ndarray, odd: np.ndarray) -> np.ndarray:
        """Gale-Ryser: sources with the most odd samples first, each to the micro-batches with the most
        room left (this always fits), ties to the streams owed the most."""
        m, unit = self.micro_batches, self.unit
        table = np.tile(base, (m, 1))
        room = np.full(m, self.batch_size - int(base.sum()), dtype=np.int64)
        for k in sorted(range(len(odd)), key=lambda k: (-odd[k], k)):
            if odd[k]:
                chosen = np.lexsort((np.arange(m), -self._stream_credits[streams, k], -room))[: odd[k]]
                table[chosen, k] += 1
                room[chosen] -= 1
                np.subtract.at(self._stream_credits[:, k], streams[chosen], unit)
        return table

    def _go_to(self, step: int) -> None:
        """Move the state to the start of global batch `step`."""
        if step < self.origin.step:
            raise ValueError(f"step {step} is before the schedule's origin {self.origin.step}")
        if step < self._step:
            self._reset()
        while self._step < step:
            at = self._step
            self._last = (at, self._advance())

    def _table(self, step: int) -> np.ndarray:
        if self._last is None or self._last[0] != step:
            self._go_to(step + 1)
        return self._last[1]

    def state_at(self, step: int) -> ScheduleState:
        """The schedule's state at the start of global batch `step` (>= the origin)."""
        self._go_to(step)
        return ScheduleState(step, list(self._delivered), list(self._credits), self._stream_credits.tolist())

    def batch_counts(self, step: int) -> list[int]:
        """Samples of each source in global batch `step` (they sum to the global batch)."""
        return self._table(step).sum(axis=0).tolist()

    def micro_counts(self, step: int, micro: int) -> list[int]:
        """Samples of each source in micro-batch `micro` (0..M-1, = accum index x world + rank) of
        global batch `step`; they sum to the micro-batch size."""
        return self._table(step)[micro].tolist()
