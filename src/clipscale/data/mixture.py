"""How many samples of each source go into every micro-batch: a deterministic schedule.

Weights hold per global batch, not only on average: global batch t (B samples) takes
`floor(B w_k)` or `floor(B w_k) + 1` samples of source k, never anything else, and every
micro-batch (b samples) takes `floor(b w_k)` or one more. Which sources and micro-batches get the
odd samples is decided by credit kept per *stream* (a stream is one DataLoader worker of one rank;
every micro-batch is made by one stream): a stream is owed the fractional part of `b w_k` of
source k for each micro-batch it makes and pays one for each odd sample it gets, and the odd
samples go to the streams owed the most. So every stream draws every source at its weight in the
long run (within a few samples), which keeps the global shares exact too (integer arithmetic:
weights are rounded to parts in 10^12), and lets the streams finish their equal shares of a
source's epoch together: a source is not repeated by one stream while another still owes samples
of its current epoch (beyond a few samples per stream).

No random draws: the schedule is a pure function of (weights, batch, world size, accumulation,
workers) and the state it started from, so a resumed run continues it exactly; a resume on
another layout starts a new schedule from the step it resumed at, carrying over the samples each
source has delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNITS = 10**12  # weights as integer parts of UNITS: exact, drift-free credit arithmetic


def weight_units(weights: list[float]) -> list[int]:
    """Normalised weights as integers summing to about UNITS (each >= 1)."""
    total = float(sum(weights))
    return [max(1, round(w / total * UNITS)) for w in weights]


@dataclass
class ScheduleState:
    """Where the schedule is: at the start of global batch `step`, with the samples each source has
    delivered so far and the odd-sample credit of every stream x source."""

    step: int = 0
    delivered: list[int] = field(default_factory=list)
    stream_credits: list[list[int]] = field(default_factory=list)

    def to_state(self) -> dict:
        return {
            "step": self.step,
            "delivered": list(self.delivered),
            "stream_credits": [list(c) for c in self.stream_credits],
        }

    @staticmethod
    def from_state(state: dict) -> ScheduleState:
        return ScheduleState(
            int(state["step"]),
            [int(d) for d in state["delivered"]],
            [[int(c) for c in row] for row in state.get("stream_credits", [])],
        )

    def copy(self) -> ScheduleState:
        return ScheduleState(self.step, list(self.delivered), [list(c) for c in self.stream_credits])


class MixtureSchedule:
    """Per-source sample counts of every global batch and micro-batch."""

    def __init__(
        self,
        weights: list[float],
        batch_size: int,
        world_size: int = 1,
        accum_steps: int = 1,
        workers: int = 1,
        origin: ScheduleState | None = None,
    ):
        self.units = np.asarray(weight_units(weights), dtype=object)  # Python ints: no overflow
        self.total_units = int(sum(self.units))
        self.batch_size, self.world_size, self.accum_steps = batch_size, world_size, accum_steps
        self.workers = max(1, workers)
        self.micro_batches = world_size * accum_steps
        self.global_batch = batch_size * self.micro_batches
        self.num_streams = world_size * self.workers
        k = len(weights)
        origin = origin.copy() if origin is not None else ScheduleState(0, [0] * k)
        if len(origin.stream_credits) != self.num_streams:  # a new layout: the streams start even
            origin.stream_credits = [[0] * k for _ in range(self.num_streams)]
        self.origin = origin
        # per micro-batch: floor(b w_k) samples of source k, plus odd ones owed at rate owed_k / total_units
        self.base = np.array([batch_size * int(u) // self.total_units for u in self.units], dtype=np.int64)
        self.owed = np.array([batch_size * int(u) % self.total_units for u in self.units], dtype=np.int64)
        self.odd_per_micro = batch_size - int(self.base.sum())
        m = self.micro_batches
        # source k has floor(M owed_k / U) or one more odd samples per batch; `ceils` of them have one more
        self.odd_floor = np.array([m * int(o) // self.total_units for o in self.owed], dtype=np.int64)
        self.ceils = m * self.odd_per_micro - int(self.odd_floor.sum())
        micro = np.arange(m)
        self._rank_of_micro, self._accum_of_micro = micro % world_size, micro // world_size
        self._reset()

    def _reset(self) -> None:
        o = self.origin
        self._step, self._delivered = o.step, list(o.delivered)
        self._credits = np.array(o.stream_credits, dtype=np.int64).reshape(self.num_streams, -1)
        self._last: tuple[int, np.ndarray] | None = None

    @property
    def num_sources(self) -> int:
        return len(self.units)

    def stream_of_micro(self, step: int) -> np.ndarray:
        """The stream that makes each micro-batch of `step`: rank x workers + (its micro-batch
        number counted from step 0) mod workers."""
        worker = (step * self.accum_steps + self._accum_of_micro) % self.workers
        return self._rank_of_micro * self.workers + worker

    def _advance(self) -> np.ndarray:
        """[M, K] counts of batch `self._step`; moves the state to the next batch."""
        m, k_sources, unit = self.micro_batches, self.num_sources, self.total_units
        streams = self.stream_of_micro(self._step)
        np.add.at(self._credits, streams, self.owed)  # every micro-batch is owed owed_k / U of source k
        table = np.tile(self.base, (m, 1))
        room = np.full(m, self.odd_per_micro, dtype=np.int64)

        def give(micro: int, k: int) -> None:
            table[micro, k] += 1
            room[micro] -= 1
            self._credits[streams[micro], k] -= unit

        # 1. the odd samples every batch must hold (floor(M x fraction) of source k): to the micro-batches with
        #    the most room (this always fits: Gale-Ryser), then the streams owed the most of it
        for k in sorted(range(k_sources), key=lambda k: (-self.odd_floor[k], k)):
            if self.odd_floor[k]:
                credit = self._credits[streams, k]
                for micro in np.lexsort((np.arange(m), -credit, -room))[: self.odd_floor[k]]:
                    give(int(micro), k)
        # 2. the remaining odd samples, one more of `ceils` sources: each to the (micro-batch, source) pair
        #    whose stream is owed the most (so no source/stream pattern can lock in)
        eligible = np.ones(k_sources, dtype=bool)
        never = np.iinfo(np.int64).min
        for _ in range(self.ceils):
            score = np.where((room[:, None] > 0) & eligible[None, :], self._credits[streams], never)
            fresh = np.where(table == self.base[None, :], score, never)  # no second odd sample of k in one micro
            pick = fresh if fresh.max() > never else score
            micro, k = np.unravel_index(int(np.argmax(pick)), pick.shape)
            give(int(micro), int(k))
            eligible[k] = False
        counts = table.sum(axis=0)
        self._delivered = [d + int(c) for d, c in zip(self._delivered, counts)]
        self._step += 1
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
        return ScheduleState(step, list(self._delivered), self._credits.tolist())

    def batch_counts(self, step: int) -> list[int]:
        """Samples of each source in global batch `step` (they sum to the global batch)."""
        return self._table(step).sum(axis=0).tolist()

    def micro_counts(self, step: int, micro: int) -> list[int]:
        """Samples of each source in micro-batch `micro` (0..M-1, = accum index x world + rank) of
        global batch `step`; they sum to the micro-batch size."""
        return self._table(step)[micro].tolist()
