"""The loss-spike guard: notice a spike, roll back, skip the data that caused it.

Large-batch contrastive training sometimes spikes (OpenCLIP issue 556); PaLM's remedy is to
restart from a checkpoint before the spike and skip the data window that led into it. The guard
keeps the median of the last `window` global losses; when the loss exceeds `factor` x that median
for `patience` consecutive steps, the trainer restores the latest checkpoint on every rank (in
the same process), consumes the next `skip_batches` global batches of data without training on
them (their samples count as consumed, so resume and re-layout stay exact), and continues. More
than `max_rollbacks` rollbacks within `within_steps` steps stop the run with a clear error.

The decision uses the global loss, the same number on every rank: every rank rolls back at the
same step with no extra collective. The guard's window is part of the checkpoint, so a resumed
run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from .config import SpikeGuardConfig

MIN_HISTORY = 5  # losses needed before a median means anything


class SpikeGuard:
    def __init__(self, cfg: SpikeGuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)
        self.above = 0  # consecutive steps above the threshold
        self.last_loss = float("nan")
        self.rollbacks: list[dict] = []  # {"step", "to_step", "loss", "median"}

    def spiked(self, loss: float) -> bool:
        """Record this step's loss; True when the run should roll back now. Non-finite losses are
        not judged here (those steps are skipped, train.max_nonfinite_steps)."""
        if not math.isfinite(loss):
            return False
        self.last_loss = loss
        if len(self.history) >= MIN_HISTORY and loss > self.cfg.factor * statistics.median(self.history):
            self.above += 1
            return self.due()
        self.above = 0
        self.history.append(loss)  # a spiking loss does not raise the median it is judged against
        return False

    def due(self) -> bool:
        """A rollback is due (also right after a resume from a checkpoint saved at the deciding step)."""
        return self.above >= self.cfg.patience

    def median(self) -> float:
        return statistics.median(self.history) if self.history else float("nan")

    def recent_rollbacks(self, step: int) -> int:
        return sum(1 for r in self.rollbacks if step - r["step"] < self.cfg.within_steps)

    def after_rollback(self) -> None:
        self.above = 0

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "above": self.above,
            "last_loss": self.last_loss,
            "rollbacks": list(self.rollbacks),
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(x) for x in state.get("history", [])), maxlen=self.cfg.window)
        self.above = int(state.get("above", 0))
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.rollbacks = list(state.get("rollbacks", []))
