"""The loss-spike guard: notice a spike, pick the checkpoint to roll back to, decide what to skip.

Large-batch contrastive training sometimes spikes (OpenCLIP issue 556); PaLM's remedy is to
restart from a checkpoint before the spike and skip the data window that led into it. The guard
keeps the median of the last `window` global losses; when the loss exceeds `factor` x that median
for `patience` consecutive steps, it plans a rollback: the newest intact checkpoint from before the
first spiking step, and the data to consume without training on it (its samples count as consumed,
so resume and re-layout stay exact): the `skip_batches` global batches that end at the step where
the spike was detected, i.e. the data that caused it, wherever it lies after the checkpoint (twice
as many when it rolls back to the same checkpoint again; none from before the checkpoint, which
trained on them already). The batches between the checkpoint and that window are trained on again.
More than `max_rollbacks` rollbacks within `within_steps` steps, or no checkpoint to go back to,
stop the run with a clear error. The trainer carries the plan out: it restores the target, replays
up to the window (`skip_due`) and consumes it. The pending skips are part of the guard's state, so a
run stopped during the replay skips the same batches after its resume.

The decision uses the global loss, the same number on every rank: every rank plans the same
rollback at the same step with no extra collective but the target's broadcast. The guard's window
is part of the checkpoint, so a resumed run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointUnreadable, TrainingDiverged
from .distributed import broadcast_object

MIN_HISTORY = 5  # losses needed before a median means anything


@dataclass
class Rollback:
    """What the trainer does about a spike: restore `target`, train up to step `skip_after`, then
    consume `skip` global batches (those of steps skip_after + 1 .. the spike's step)."""

    target: Path
    skip: int
    skip_after: int
    record: dict  # {"step", "to_step", "loss", "median", "skipped_batches", "skipped_steps"}: status and metrics
    history: list  # every rollback of the run, this one included (restoring the target forgets the later ones)

    def event(self, restored_step: int, count: int) -> dict:
        """The metrics.jsonl record of the rollback (logged at the step that follows the skipped data)."""
        return {
            "event": "rollback",
            "rollback/from_step": self.record["step"],
            "rollback/to_step": restored_step,
            "rollback/loss": self.record["loss"],
            "rollback/median": self.record["median"],
            "rollback/skipped_batches": self.skip,
            "rollback/skipped_steps": self.record["skipped_steps"],
            "rollback/count": count,
        }


class SpikeGuard:
    """`cfg`: train.spike_guard (None: the guard is off and never fires)."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window if cfg else 1)
        self.above = 0  # consecutive steps above the threshold
        self.last_loss = float("nan")
        self.rollbacks: list[dict] = []  # the records of every rollback of the run
        self.pending: list[dict] = []  # [{"after": step, "batches": n}]: skips the replay has not reached

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    # ------------------------------------------------------------------ detect
    def spiked(self, loss: float) -> bool:
        """Record this step's loss; True when the run should roll back now. Non-finite losses are
        not judged here (those steps are skipped, train.max_nonfinite_steps)."""
        if not self.enabled or not math.isfinite(loss):
            return False
        self.last_loss = loss
        if len(self.history) >= MIN_HISTORY and loss > self.cfg.factor * statistics.median(self.history):
            self.above += 1
            return self.due()
        self.above = 0
        self.history.append(loss)  # a spiking loss does not raise the median it is judged against
        return False

    def new_baseline(self) -> None:
        """A training stage that changes what the loss measures (its batch, inputs or masking: the contrastive
        loss grows with log(batch)) begins: its steps are judged against their own median, not the last
        stage's."""
        self.history.clear()
        self.above = 0

    def due(self) -> bool:
        """A rollback is due (also right after a resume from a checkpoint saved at the deciding step)."""
        return self.enabled and self.above >= self.cfg.patience

    @property
    def spiking(self) -> bool:
        """The loss is above the threshold now: no checkpoint may be saved (it must come from before)."""
        return self.above > 0

    def spike_start(self, step: int) -> int | None:
        """The first step of the spike in progress at `step` (None when there is none): the checkpoint
        to roll back to must come from before it."""
        return step - self.above + 1 if self.spiking else None

    def median(self) -> float:
        return statistics.median(self.history) if self.history else float("nan")

    def recent_rollbacks(self, step: int) -> int:
        return sum(1 for r in self.rollbacks if step - r["step"] < self.cfg.within_steps)

    # ------------------------------------------------------------------ plan
    def plan(self, step: int, loss: float, ckpts, also: Path | None, is_main: bool) -> Rollback:
        """Collective: the rollback for a spike decided at `step`. `ckpts` finds the target (the
        checkpoint manager's rollback_target, on the main rank; broadcast); `also`: the checkpoint this
        run resumed from (maybe another run's). TrainingDiverged when the run must stop instead."""
        first = self.spike_start(step)
        recent = self.recent_rollbacks(step)
        if recent >= self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"the loss spiked again at step {step} ({loss:.4g}, {self.cfg.factor} x the median "
                f"{self.median():.4g} exceeded for {self.above} steps) after {recent} rollback(s) within "
                f"{self.cfg.within_steps} steps; training stopped. Lower optim.lr, raise "
                f"train.spike_guard.skip_batches, or check the data"
            )
        target, unreadable = None, None
        if is_main:
            try:
                target = ckpts.rollback_target(first, also)
            except CheckpointUnreadable as exn:  # every rank must hear of it, not wait in the broadcast
                unreadable = str(exn)
        target, unreadable = broadcast_object((str(target) if target else None, unreadable))
        if unreadable:
            raise CheckpointUnreadable(unreadable)
        if target is None:
            raise TrainingDiverged(
                f"the loss spiked at step {step} ({loss:.4g} > {self.cfg.factor} x the median "
                f"{self.median():.4g} for {self.above} steps) and there is no checkpoint from before step "
                f"{first} to roll back to; save checkpoints more often (checkpoint.every_n_steps)"
            )
        target = Path(target)
        to_step = ckpts.step_of(target)
        again = sum(1 for r in self.rollbacks if r.get("to_step") == to_step)  # the same data would spike again
        skip = min(self.cfg.skip_batches * (1 + again), step - to_step)  # the batches that end at the spike
        record = {
            "step": step,
            "to_step": to_step,
            "loss": loss,
            "median": self.median(),
            "skipped_batches": skip,
            "skipped_steps": [step - skip + 1, step] if skip else [],  # the steps that had trained on them
        }
        return Rollback(target, skip, step - skip, record, [*self.rollbacks, record])

    def rolled_back(self, rollback: Rollback) -> None:
        """After the trainer restored the target (which restored this guard's state from before the
        spike): the history of rollbacks outlives the restored state; the skip waits for its step."""
        self.rollbacks = list(rollback.history)
        self.above = 0
        # A skip restored with the target (it was saved during an earlier rollback's replay) still stands;
        # the batches of its window now come `rollback.skip` steps earlier if it lies after the new one.
        earlier = [
            {
                "after": w["after"] - rollback.skip if w["after"] > rollback.skip_after else w["after"],
                "batches": w["batches"],
            }
            for w in self.pending
        ]
        self.pending = earlier + ([{"after": rollback.skip_after, "batches": rollback.skip}] if rollback.skip else [])

    def skip_due(self, step: int) -> int:
        """The number of global batches to consume now, after optimizer step `step` (0: none)."""
        due = [w for w in self.pending if w["after"] == step]
        self.pending = [w for w in self.pending if w["after"] != step]
        return sum(w["batches"] for w in due)

    # ------------------------------------------------------------------ Stateful
    def state_dict(self) -> dict:
        return {
            "history": list(self.history),
            "above": self.above,
            "last_loss": self.last_loss,
            "rollbacks": list(self.rollbacks),
            "pending": self.pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(x) for x in state.get("history", [])), maxlen=self.history.maxlen)
        self.above = int(state.get("above", 0))
        self.last_loss = float(state.get("last_loss", float("nan")))
        self.rollbacks = list(state.get("rollbacks", []))
        pending = state.get("pending") or []
        self.pending = [dict(pending)] if isinstance(pending, dict) else [dict(w) for w in pending]
