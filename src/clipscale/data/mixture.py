"""How many samples of each source go into every micro-batch: a deterministic schedule.

Weights hold per global batch, not only on average: global batch t (B samples) takes
`floor(B w_k)` or `floor(B w_k) + 1` samples of source k, never anything else, and which
sources get the extra sample is decided by accumulated credit (exact integer arithmetic:
weights are rounded to parts in 10^12), so over many batches each source's share converges to
its weight with a bounded error of a few samples, whatever the weights. The B samples are then
spread over the M = world_size x accum_steps micro-batches of the step: each micro-batch gets
`floor(c_k / M)` or one more of source k, the extra samples rotating over the micro-batches
from step to step (no rank always gets the odd sample).

No random draws: the schedule is a pure function of (weights, B, M) and where it started, so a
resumed run continues it exactly, and a resume on another world size continues it with the new
M from the step it resumed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNITS = 10**12  # weights as integer parts of UNITS: exact, drift-free credit arithmetic


def weight_units(weights: list[float]) -> list[int]:
    """Normalised weights as integers summing to about UNITS (each >= 1)."""
    total = float(sum(weights))
    return [max(1, round(w / total * UNITS)) for w in weights]


@dataclass
class ScheduleState:
    """Where the schedule is: at the start of global batch `step`, with the extra-sample credit of
    every source and the samples each has delivered so far."""

    step: int = 0
    credits: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)

    def to_state(self) -> dict:
        return {"step": self.step, "credits": list(self.credits), "delivered": list(self.delivered)}

    @staticmethod
    def from_state(state: dict) -> ScheduleState:
        return ScheduleState(
            int(state["step"]), [int(c) for c in state["credits"]], [int(d) for d in state["delivered"]]
        )


class MixtureSchedule:
    """Per-source sample counts of every global batch and micro-batch."""

    def __init__(
        self, weights: list[float], global_batch: int, micro_batches: int, origin: ScheduleState | None = None
    ):
        if global_batch % micro_batches:
            raise ValueError("the global batch must be a whole number of micro-batches")
        self.units = weight_units(weights)
        self.total_units = sum(self.units)
        self.global_batch = global_batch
        self.micro_batches = micro_batches
        k = len(weights)
        self.origin = origin or ScheduleState(0, [0] * k, [0] * k)
        self.base = [global_batch * u // self.total_units for u in self.units]
        self.remainders = [global_batch * u % self.total_units for u in self.units]
        self.extras = global_batch - sum(self.base)  # sources that get one more sample, every batch
        self._at = ScheduleState(self.origin.step, list(self.origin.credits), list(self.origin.delivered))
        self._cache: dict[int, list[int]] = {}

    @property
    def num_sources(self) -> int:
        return len(self.units)

    def _advance(self) -> list[int]:
        """The counts of batch `self._at.step`; moves the state to the next batch."""
        at = self._at
        credits = [c + r for c, r in zip(at.credits, self.remainders)]
        chosen = sorted(range(len(credits)), key=lambda k: (-credits[k], k))[: self.extras]
        counts = list(self.base)
        for k in chosen:
            counts[k] += 1
            credits[k] -= self.total_units
        self._at = ScheduleState(at.step + 1, credits, [d + c for d, c in zip(at.delivered, counts)])
        return counts

    def state_at(self, step: int) -> ScheduleState:
        """The schedule's state at the start of global batch `step` (>= the origin)."""
        if step < self.origin.step:
            raise ValueError(f"step {step} is before the schedule's origin {self.origin.step}")
        if step < self._at.step:
            self._at = ScheduleState(self.origin.step, list(self.origin.credits), list(self.origin.delivered))
        while self._at.step < step:
            self._advance()
        return ScheduleState(self._at.step, list(self._at.credits), list(self._at.delivered))

    def batch_counts(self, step: int) -> list[int]:
        """Samples of each source in global batch `step` (they sum to the global batch)."""
        if step not in self._cache:
            self.state_at(step)
            self._cache = {step: self._advance()}  # sequential use: keep only the latest
        return self._cache[step]

    def micro_counts(self, step: int, micro: int) -> list[int]:
        """Samples of each source in micro-batch `micro` (0..M-1, = accum index x world + rank) of
        global batch `step`; they sum to the micro-batch size."""
        m = self.micro_batches
        counts = self.batch_counts(step)
        rotation = step % m
        out, first_extra = [], 0
        for c in counts:
            q, r = divmod(c, m)
            # this source's r extra samples go to micro-batches first_extra+rotation, ... (mod m)
            out.append(q + (1 if (micro - rotation - first_extra) % m < r else 0))
            first_extra += r
        return out
